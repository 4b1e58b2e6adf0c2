"""``python -m gpuflow`` runs the CLI."""

from gpuflow.cli import main

main()
