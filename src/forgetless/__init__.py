"""forgetless: fine-tune language models on small task data without losing what they already know.

Importing it changes nothing process-wide (no environment variables, allocator or logging settings);
the `forgetless` command line sets up logging and, on a CPU, glibc's allocator (forgetless.memory).
"""

__version__ = "0.3.0"
