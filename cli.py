"""Run the lungcbir command line from a checkout: ``python cli.py --help``."""

from lungcbir.cli import run

if __name__ == "__main__":
    run()
