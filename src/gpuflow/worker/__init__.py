"""The worker SDK and agent: handlers per task type, GPU detection, executors, transports."""
