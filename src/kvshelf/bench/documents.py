"""Real prose for benchmark documents: the docstrings of Python's standard library.

They ship with every Python, so benchmarks need no download, and they are real text not
written by this project. Documents are token windows cut from that corpus.
"""

import importlib
import inspect
import pkgutil
import sys
import warnings

QUESTIONS = (
    "Summarize the text above in one sentence.",
    "What is the main topic of the text above?",
    "Name three functions or classes mentioned above.",
    "Which module does the text above describe first?",
    "Give one example of how the text above could be used.",
    "What would a beginner find hardest in the text above?",
)

_MODULES = (
    "collections",
    "functools",
    "itertools",
    "pathlib",
    "json",
    "re",
    "datetime",
    "argparse",
    "logging",
    "subprocess",
    "threading",
    "asyncio",
    "typing",
    "dataclasses",
    "unittest",
    "email",
    "http",
    "urllib",
    "sqlite3",
    "decimal",
    "fractions",
    "statistics",
    "random",
    "string",
)


def stdlib_corpus() -> str:
    """Docstrings of a fixed list of stdlib modules and their public members, in a fixed order."""
    parts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _MODULES:
            for module in _module_and_submodules(name):
                parts.append(inspect.getdoc(module) or "")
                for _, member in sorted(inspect.getmembers(module), key=lambda item: item[0]):
                    if getattr(member, "__module__", None) == module.__name__:
                        parts.append(inspect.getdoc(member) or "")
    return "\n\n".join(part for part in parts if part)


def _module_and_submodules(name: str) -> list:
    module = importlib.import_module(name)
    modules = [module]
    for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", [])), key=lambda info: info.name):
        if not info.name.startswith("_") and "test" not in info.name:
            try:
                modules.append(importlib.import_module(f"{name}.{info.name}"))
            except Exception:  # noqa: BLE001 - a submodule needing an absent platform feature
                continue
    return modules


def documents(token_ids: list[int], num_docs: int, num_tokens: int) -> list[list[int]]:
    """`num_docs` distinct windows of `num_tokens` tokens from the tokenized corpus."""
    needed = num_docs * num_tokens
    if len(token_ids) < needed:
        repeats = needed // len(token_ids) + 1
        print(f"corpus has {len(token_ids)} tokens; repeating it {repeats}x", file=sys.stderr)
        token_ids = token_ids * repeats
    return [token_ids[i * num_tokens : (i + 1) * num_tokens] for i in range(num_docs)]
