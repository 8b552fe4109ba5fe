"""Guest kernels built from source: minimal config, build cache, references, bisect."""
from .build import BuildError, BuildRequest, build_kernel
from .config import ConfigError
from .source import SourceError
from .spec import KernelRef, KernelRefError, ResolvedKernel, parse_ref, resolve
from .store import StoreError

__all__ = ["BuildError", "BuildRequest", "build_kernel", "ConfigError", "SourceError", "KernelRef",
           "KernelRefError", "ResolvedKernel", "parse_ref", "resolve", "StoreError"]
