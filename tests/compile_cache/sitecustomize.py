"""Put on PYTHONPATH by tests/test_readme.py for the README's commands: when such a process imports
fastmmoe_compile.lower.inductor, its package_aoti goes through the test session's AOTInductor compile
cache (fastmmoe_test_cache.py, beside this file). Nothing else is changed, and nothing is imported
until that module is."""
import importlib.abc
import importlib.util
import os
import sys

_TARGET = "fastmmoe_compile.lower.inductor"


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # find the real module once, then wrap its loader
        spec = importlib.util.find_spec(name)
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastmmoe_test_cache.py")
            cache_spec = importlib.util.spec_from_file_location("fastmmoe_test_cache", path)
            cache = importlib.util.module_from_spec(cache_spec)
            cache_spec.loader.exec_module(cache)
            module.package_aoti = cache.cached(module.package_aoti)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("FASTMMOE_TEST_AOTI_CACHE"):
    sys.meta_path.insert(0, _AfterImport())


def _chain() -> None:
    """Run the sitecustomize this one shadows, if the interpreter has one (e.g. a distribution's)."""
    import importlib.machinery

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.origin and os.path.abspath(spec.origin) != os.path.abspath(__file__):
        code = compile(open(spec.origin, encoding="utf-8").read(), spec.origin, "exec")
        exec(code, {"__name__": "sitecustomize", "__file__": spec.origin})  # noqa: S102


_chain()
