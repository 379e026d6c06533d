"""Loaded at interpreter start when this folder is on PYTHONPATH: the tests' Hub double for subprocesses."""

import os

if os.environ.get("SLM_TEST_HUB_ROOT"):
    from folder_hub import install

    install(os.environ["SLM_TEST_HUB_ROOT"])
