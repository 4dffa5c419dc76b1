"""Registry workflows for ``faster_whisper`` models: register, evaluate, compare, promote.

Every workflow is a library function in its own module; the ``whisper-registry`` CLI only parses
and prints::

    from whisper_registry.register import register
    from whisper_registry.evaluate import evaluate
    from whisper_registry.promote import promote

    result = register("./whisper-small-zh", "whisper-zh", ["int8", "float16"])
    evaluate("models:/whisper-zh/1", "test.jsonl")
    promote("whisper-zh", "1", "staging", gates=["cer<=0.08"])

The functions are deliberately not re-exported here: a package attribute named like a submodule
(``whisper_registry.evaluate`` the function vs the module) breaks ``import ... as`` and patching.
"""

import importlib.metadata as _metadata

try:  # one version, the distribution's (pyproject.toml)
    __version__ = _metadata.version("mlflow-faster-whisper")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
