"""Run the lungcbir command line from a checkout: ``python cli.py --help``."""

from lungcbir.cli import main

if __name__ == "__main__":
    main()
