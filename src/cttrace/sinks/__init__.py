"""Where findings go: the terminal, JSON lines, Alertmanager, metrics."""
