"""forgetless: fine-tune language models on small task data without losing what they already know."""

import os as _os

# Offline by design: nothing may reach a model hub at run time. Set before transformers is imported.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
