"""`python -m llama_ctx ...`: the `llama-ctx` command line."""

import sys

from .cli import main

sys.exit(main())
