"""Serve a gptmini checkpoint: ``python serve.py ckpt=PATH`` — the OpenAI API under /v1 and a chat page at /.

The same as ``gptmini serve ckpt=PATH`` (gptmini/cli.py); see configs/serve.yaml and docs/serving.md.
"""

import sys

from gptmini.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("serve", sys.argv[1:]))
