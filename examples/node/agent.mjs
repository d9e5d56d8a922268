/**
 * The bundled Node.js agent: arithmetic word problems solved with a calculator tool, traced with the
 * OpenTelemetry JS SDK and sent over OTLP/HTTP to the tracelearn collector sidecar.
 *
 * It shows that capture is language-neutral: nothing here is tracelearn code. The agent calls an
 * OpenAI-compatible chat-completions endpoint with fetch and writes its own spans with the GenAI
 * semantic conventions, which the collector normalizes like any Python instrumentation's:
 *
 *   invoke_agent solver     gen_ai.operation.name=invoke_agent; tracelearn.task.id, tracelearn.metadata.gold
 *     chat MODEL            gen_ai.operation.name=chat, gen_ai.input.messages / gen_ai.output.messages
 *                           (parts JSON), usage, finish reasons, and the server's token ids and logprobs
 *     execute_tool calculator   gen_ai.operation.name=execute_tool, gen_ai.tool.name, call id, arguments, result
 *     tracelearn.reward     tracelearn.span.type=reward, tracelearn.reward.name=correct, .value, .primary
 *
 * Rollout identity travels as baggage (tracelearn.rollout.id, tracelearn.task.id, tracelearn.agent.name),
 * copied onto every span by a span processor, as tracelearn's Python span processor does.
 *
 *   OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 OPENAI_BASE_URL=http://127.0.0.1:8000/v1 \
 *     node examples/node/agent.mjs --tasks examples/calc/tasks.jsonl --limit 5
 *
 * Environment: OPENAI_BASE_URL (default http://127.0.0.1:8000/v1), OPENAI_API_KEY (default
 * "not-needed"), OPENAI_MODEL (default SmolLM2-135M-Instruct), TRACELEARN_TOKEN_IDS (on, off, auto:
 * ask loopback and private servers only), and the SDK's OTEL_* variables (OTEL_SERVICE_NAME,
 * OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS for a bearer token, ...).
 * Exits 1 when spans could not be delivered to the collector.
 */

import { createHash, randomUUID } from 'node:crypto';
import { readFileSync, realpathSync } from 'node:fs';
import { isIP } from 'node:net';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { context, diag, DiagConsoleLogger, DiagLogLevel, propagation, SpanKind, SpanStatusCode, trace } from '@opentelemetry/api';
import { ExportResultCode } from '@opentelemetry/core';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-proto';
import { defaultResource, detectResources, envDetector, resourceFromAttributes } from '@opentelemetry/resources';
import { BatchSpanProcessor, NodeTracerProvider } from '@opentelemetry/sdk-trace-node';

const DEFAULT_BASE_URL = 'http://127.0.0.1:8000/v1';
const DEFAULT_MODEL = 'SmolLM2-135M-Instruct';
const AGENT_NAME = 'solver';
// The calc example's prompt and tool, so the two agents' rollouts are comparable.
const SYSTEM_PROMPT = 'Solve the arithmetic. Use the calculator tool, then reply with the number only.';
const CALCULATOR_TOOL = {
  type: 'function',
  function: {
    name: 'calculator',
    description: 'Evaluate an arithmetic expression such as 12 + 30.',
    parameters: {
      type: 'object',
      properties: { expression: { type: 'string', description: 'e.g. 12 + 30' } },
      required: ['expression'],
    },
  },
};
const ROLLOUT_KEYS = ['tracelearn.rollout.id', 'tracelearn.task.id', 'tracelearn.agent.name'];
const REQUEST_TIMEOUT_MS = 300_000;
const MAX_EXPRESSION_CHARS = 200;

// --- Tracing -----------------------------------------------------------------------------------------

/** Copies the rollout identity in the baggage onto every span started under it. */
class RolloutAttributes {
  onStart(span, parentContext) {
    const baggage = propagation.getBaggage(parentContext);
    for (const key of ROLLOUT_KEYS) {
      const entry = baggage?.getEntry(key);
      if (entry !== undefined) span.setAttribute(key, entry.value);
    }
  }
  onEnd() {}
  forceFlush() { return Promise.resolve(); }
  shutdown() { return Promise.resolve(); }
}

/** Counts the spans the exporter could not deliver, so a lost batch ends the run with an error. */
class DeliveryCountingExporter {
  constructor(inner) {
    this.inner = inner;
    this.undelivered = 0;
  }
  export(spans, resultCallback) {
    this.inner.export(spans, (result) => {
      if (result.code !== ExportResultCode.SUCCESS) this.undelivered += spans.length;
      resultCallback(result);
    });
  }
  forceFlush() { return this.inner.forceFlush(); }
  shutdown() { return this.inner.shutdown(); }
}

function startTracing() {
  diag.setLogger(new DiagConsoleLogger(), DiagLogLevel.WARN); // export failures on stderr, not silent
  // OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES override the default name.
  const resource = defaultResource()
    .merge(resourceFromAttributes({ 'service.name': 'node-agent' }))
    .merge(detectResources({ detectors: [envDetector] }));
  const exporter = new DeliveryCountingExporter(new OTLPTraceExporter()); // endpoint from OTEL_EXPORTER_OTLP_*
  const provider = new NodeTracerProvider({
    resource,
    spanProcessors: [new RolloutAttributes(), new BatchSpanProcessor(exporter)],
  });
  provider.register(); // AsyncLocalStorage context: the active span follows every await
  return { provider, exporter };
}

const tracer = trace.getTracer('examples.node');

// --- The tool ----------------------------------------------------------------------------------------

/** Evaluate + - * / and parentheses on numbers with a small recursive-descent parser (never eval). */
export function calculate(expression) {
  if (expression.length > MAX_EXPRESSION_CHARS) throw new Error('expression is too long');
  const tokens = expression.match(/\d+(?:\.\d+)?|[-+*/()]|\S/g) ?? [];
  let at = 0;
  const peek = () => tokens[at];
  const take = () => tokens[at++];
  const primary = () => {
    const token = take();
    if (token === '-') return -primary();
    if (token === '+') return primary();
    if (token === '(') {
      const value = sum();
      if (take() !== ')') throw new Error('missing )');
      return value;
    }
    if (token !== undefined && /^\d/.test(token)) return Number(token);
    throw new Error(token === undefined ? 'unexpected end' : `unexpected ${JSON.stringify(token)}`);
  };
  const product = () => {
    let value = primary();
    while (peek() === '*' || peek() === '/') {
      if (take() === '*') value *= primary();
      else {
        const divisor = primary();
        if (divisor === 0) throw new Error('division by zero');
        value /= divisor;
      }
    }
    return value;
  };
  const sum = () => {
    let value = product();
    while (peek() === '+' || peek() === '-') value = take() === '+' ? value + product() : value - product();
    return value;
  };
  const value = sum();
  if (at < tokens.length) throw new Error(`unexpected ${JSON.stringify(tokens[at])}`);
  return String(Number.isInteger(value) ? value : Math.round(value * 1e6) / 1e6);
}

/** A tool call's result; every failure (bad JSON, unknown tool, bad expression) is a result too. */
function runTool(name, argumentsText) {
  if (name !== 'calculator') return { result: `error: unknown tool ${JSON.stringify(name)}`, failed: true };
  try {
    const parsed = JSON.parse(argumentsText || '{}');
    const expression = typeof parsed === 'object' && parsed !== null ? parsed.expression : parsed;
    if (!['string', 'number'].includes(typeof expression)) {
      return { result: 'error: call calculator with {"expression": "..."}', failed: true };
    }
    return { result: calculate(String(expression)), failed: false };
  } catch (error) {
    return { result: `error: ${error.message}`, failed: true };
  }
}

function toolSpan(call) {
  const attributes = {
    'gen_ai.operation.name': 'execute_tool',
    'gen_ai.tool.name': call.function.name,
    'gen_ai.tool.type': 'function',
    'gen_ai.tool.call.id': call.id,
    'gen_ai.tool.call.arguments': call.function.arguments,
  };
  return tracer.startActiveSpan(`execute_tool ${call.function.name}`, { kind: SpanKind.INTERNAL, attributes }, (span) => {
    const { result, failed } = runTool(call.function.name, call.function.arguments);
    span.setAttribute('gen_ai.tool.call.result', result);
    if (failed) span.setStatus({ code: SpanStatusCode.ERROR, message: result });
    span.end();
    return result;
  });
}

// --- The model ---------------------------------------------------------------------------------------

/** An error as one line; fetch hides why it failed (refused, reset, timeout) in its cause. */
function describe(error) {
  const cause = error.cause === undefined ? '' : ` (${error.cause.message ?? error.cause})`;
  return `${error.name}: ${error.message}${cause}`;
}

/** OpenAI chat messages in the GenAI conventions' parts form (what gen_ai.*.messages hold). */
function toParts(message) {
  if (message.role === 'tool') {
    return { role: 'tool', parts: [{ type: 'tool_call_response', id: message.tool_call_id, response: message.content }] };
  }
  const parts = message.content ? [{ type: 'text', content: message.content }] : [];
  for (const call of message.tool_calls ?? []) {
    // Arguments stay the exact text the model generated: that is what training reads back.
    parts.push({ type: 'tool_call', id: call.id, name: call.function.name, arguments: call.function.arguments });
  }
  return { role: message.role, parts };
}

/** The TRACELEARN_TOKEN_IDS rule: auto asks only servers on loopback, private or local-network names. */
function asksForTokenIds(baseUrl, mode) {
  if (mode === 'on') return true;
  if (mode === 'off') return false;
  const host = new URL(baseUrl).hostname.replace(/^\[|\]$/g, '').toLowerCase();
  if (isIP(host) === 4) return /^(127\.|10\.|192\.168\.|169\.254\.|172\.(1[6-9]|2\d|3[01])\.)/.test(host);
  if (isIP(host) === 6) return host === '::1' || /^f[cd]|^fe[89ab]/.test(host);
  return host === 'localhost' || /\.(localhost|local|internal)$/.test(host) || !host.includes('.');
}

class ChatClient {
  constructor(baseUrl, apiKey, settings) {
    this.url = `${baseUrl.replace(/\/+$/, '')}/chat/completions`;
    this.apiKey = apiKey;
    this.settings = settings;
    this.askTokenIds = asksForTokenIds(baseUrl, (process.env.TRACELEARN_TOKEN_IDS || 'auto').toLowerCase());
    this.askedBefore = false; // whether a request with the token-id fields was answered yet
  }

  /** Whether an error answer refuses the token-id fields: any 400/422 to the first asking request
   * (the server does not know them), or later an error that names them. */
  refusesTokenIds(answer) {
    if (answer.status !== 400 && answer.status !== 422) return false;
    return !this.askedBefore || JSON.stringify(answer.payload).includes('return_token_ids');
  }

  async post(body) {
    const response = await fetch(this.url, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${this.apiKey}` },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
    return { status: response.status, payload: await response.json().catch(() => ({})) };
  }

  /** One chat completion inside a `chat MODEL` span; returns the assistant message. */
  async complete(messages, seed) {
    const { model, maxTokens, temperature } = this.settings;
    const attributes = {
      'gen_ai.operation.name': 'chat',
      'gen_ai.provider.name': 'openai',
      'gen_ai.request.model': model,
      'gen_ai.request.max_tokens': maxTokens,
      'gen_ai.request.temperature': temperature,
      'gen_ai.input.messages': JSON.stringify(messages.map(toParts)),
    };
    if (seed !== undefined) attributes['gen_ai.request.seed'] = seed;
    return tracer.startActiveSpan(`chat ${model}`, { kind: SpanKind.CLIENT, attributes }, async (span) => {
      try {
        const body = { model, messages, tools: [CALCULATOR_TOOL], max_tokens: maxTokens, temperature, seed };
        let status = 'not_requested';
        let answer;
        if (this.askTokenIds) {
          // vLLM's extension (and tracelearn serve's): the ids it generated and their logprobs.
          answer = await this.post({ ...body, return_token_ids: true, logprobs: true });
          status = 'server';
          if (this.refusesTokenIds(answer)) {
            this.askTokenIds = false; // a server that refuses the fields is not asked again
            status = 'rejected_by_server';
            answer = await this.post(body);
          }
          this.askedBefore = true;
        } else {
          answer = await this.post(body);
        }
        const { payload } = answer;
        if (answer.status !== 200) throw new Error(`HTTP ${answer.status}: ${payload?.error?.message ?? 'no message'}`);
        const choice = payload.choices[0];
        const message = { role: 'assistant', content: choice.message.content ?? null };
        if (choice.message.tool_calls?.length) message.tool_calls = choice.message.tool_calls;
        span.setAttributes({
          'gen_ai.response.id': payload.id,
          'gen_ai.response.model': payload.model,
          'gen_ai.response.finish_reasons': [choice.finish_reason],
          'gen_ai.usage.input_tokens': payload.usage?.prompt_tokens,
          'gen_ai.usage.output_tokens': payload.usage?.completion_tokens,
          'gen_ai.output.messages': JSON.stringify([{ ...toParts(message), finish_reason: choice.finish_reason }]),
        });
        if (status === 'server') {
          if (Array.isArray(payload.prompt_token_ids) && Array.isArray(choice.token_ids)) {
            span.setAttributes({
              'tracelearn.llm.prompt_token_ids': payload.prompt_token_ids,
              'tracelearn.llm.response_token_ids': choice.token_ids,
            });
            const logprobs = choice.logprobs?.content?.map((entry) => entry.logprob);
            if (logprobs?.length === choice.token_ids.length) span.setAttribute('tracelearn.llm.response_logprobs', logprobs);
          } else {
            status = 'missing_in_response';
          }
        }
        span.setAttribute('tracelearn.llm.token_ids_status', status);
        return message;
      } catch (error) {
        span.recordException(error);
        span.setStatus({ code: SpanStatusCode.ERROR, message: describe(error) });
        span.setAttribute('error.type', error.name);
        throw error;
      } finally {
        span.end();
      }
    });
  }
}

// --- The loop ----------------------------------------------------------------------------------------

/** The calc agent's request seeds: the same task, sample and turn draw the same seed in every run. */
function requestSeed(base, task, turn) {
  if (base === undefined) return undefined;
  return createHash('sha256').update(`${base}:${task.id}:${task.sample}:${turn}`).digest().readUInt32BE(0);
}

async function solve(client, task, settings) {
  const messages = [{ role: 'system', content: SYSTEM_PROMPT }, { role: 'user', content: task.question }];
  for (let turn = 0; turn < settings.maxTurns; turn++) {
    const message = await client.complete(messages, requestSeed(settings.seed, task, turn));
    messages.push(message);
    if (!message.tool_calls) return (message.content ?? '').trim();
    for (const call of message.tool_calls) {
      messages.push({ role: 'tool', tool_call_id: call.id, content: toolSpan(call) });
    }
  }
  return '';
}

/** 1 when the reply's last number is the gold number (the calc example's reward), else 0; a gold
 * answer that is not a number must match the reply exactly. */
export function score(answer, gold) {
  if (!Number.isFinite(Number(gold.replaceAll(',', '')))) return answer.trim() === gold.trim() ? 1 : 0;
  const numbers = answer.replaceAll(',', '').match(/-?\d+(?:\.\d+)?/g);
  return numbers !== null && Number(numbers.at(-1)) === Number(gold.replaceAll(',', '')) ? 1 : 0;
}

function emitReward(value) {
  const attributes = {
    'tracelearn.span.type': 'reward',
    'tracelearn.reward.name': 'correct',
    'tracelearn.reward.value': value,
    'tracelearn.reward.primary': true,
  };
  tracer.startActiveSpan('tracelearn.reward', { attributes }, (span) => span.end());
}

/** One rollout: its own trace, with its identity in the baggage for every span under it. */
async function runTask(client, task, settings) {
  const rolloutId = randomUUID();
  const baggage = propagation.createBaggage({
    'tracelearn.rollout.id': { value: rolloutId },
    'tracelearn.task.id': { value: task.id },
    'tracelearn.agent.name': { value: AGENT_NAME },
  });
  const attributes = {
    'gen_ai.operation.name': 'invoke_agent',
    'gen_ai.agent.name': AGENT_NAME,
    // The gold answer as rollout metadata lets a pipeline reward function recompute the reward.
    'tracelearn.metadata.gold': task.answer,
    'tracelearn.metadata.sample': String(task.sample),
  };
  const root = { root: true, attributes };
  return context.with(propagation.setBaggage(context.active(), baggage), () =>
    tracer.startActiveSpan(`invoke_agent ${AGENT_NAME}`, root, async (span) => {
      let answer = '';
      let error;
      try {
        answer = await solve(client, task, settings);
      } catch (failure) { // one failed task must not end the run
        error = describe(failure);
        span.setStatus({ code: SpanStatusCode.ERROR, message: error });
      }
      const reward = score(answer, task.answer);
      emitReward(reward);
      span.end();
      const line = { id: task.id, sample: task.sample, rollout_id: rolloutId, answer, gold: task.answer, reward };
      if (error !== undefined) line.error = error;
      process.stdout.write(`${JSON.stringify(line)}\n`);
    }));
}

function readTasks(path, limit, samples) {
  const tasks = readFileSync(path, 'utf8').split('\n').flatMap((text, index) => {
    if (!text.trim()) return [];
    const row = JSON.parse(text);
    for (const field of ['id', 'question', 'answer']) {
      if (row[field] === undefined) throw new Error(`${path}:${index + 1}: task has no ${field} field (needs id, question, answer)`);
    }
    return [{ id: String(row.id), question: String(row.question), answer: String(row.answer) }];
  });
  const chosen = limit === undefined ? tasks : tasks.slice(0, limit);
  return chosen.flatMap((task) => Array.from({ length: samples }, (_, sample) => ({ ...task, sample })));
}

function positiveInteger(text, name) {
  const value = Number(text);
  if (!Number.isInteger(value) || value < 1) throw new Error(`--${name} must be a positive integer, not ${text}`);
  return value;
}

function finiteNumber(text, name) {
  const value = Number(text);
  if (!Number.isFinite(value)) throw new Error(`--${name} must be a number, not ${text}`);
  return value;
}

async function main() {
  const { values: options } = parseArgs({
    options: {
      tasks: { type: 'string', default: fileURLToPath(new URL('../calc/tasks.jsonl', import.meta.url)) },
      limit: { type: 'string' },
      samples: { type: 'string', default: '1' },
      seed: { type: 'string' },
      model: { type: 'string', default: process.env.OPENAI_MODEL || DEFAULT_MODEL },
      'max-turns': { type: 'string', default: '4' },
      'max-tokens': { type: 'string', default: '64' },
      temperature: { type: 'string', default: '0.7' },
    },
  });
  const settings = {
    model: options.model,
    maxTurns: positiveInteger(options['max-turns'], 'max-turns'),
    maxTokens: positiveInteger(options['max-tokens'], 'max-tokens'),
    temperature: finiteNumber(options.temperature, 'temperature'),
    seed: options.seed === undefined ? undefined : finiteNumber(options.seed, 'seed'),
  };
  const limit = options.limit === undefined ? undefined : positiveInteger(options.limit, 'limit');
  const tasks = readTasks(options.tasks, limit, positiveInteger(options.samples, 'samples'));
  const { provider, exporter } = startTracing();
  const client = new ChatClient(process.env.OPENAI_BASE_URL || DEFAULT_BASE_URL, process.env.OPENAI_API_KEY || 'not-needed', settings);
  for (const task of tasks) await runTask(client, task, settings);
  // Flushes the batch processor: every span is sent (or known lost) before exit.
  const failure = await provider.shutdown().then(() => undefined, (error) => error);
  if (exporter.undelivered > 0 || failure !== undefined) {
    const why = failure === undefined ? '' : ` (${failure.message})`;
    process.stderr.write(`node agent: ${exporter.undelivered} spans were not delivered to the OTLP endpoint${why}\n`);
    process.exitCode = 1;
  }
}

// Run when executed (node agent.mjs), not when imported for its calculator and reward; realpath,
// because the module's URL has symlinks resolved and argv[1] does not.
if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === realpathSync(process.argv[1])) {
  await main().catch((error) => {
    process.stderr.write(`node agent: ${error.message}\n`);
    process.exitCode = 2;
  });
}
