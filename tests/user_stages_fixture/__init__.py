"""User-stage and reward-function modules that pipeline config tests name by import path."""
