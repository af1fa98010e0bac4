"""Real components for tests and benchmarks: the harness that starts them on free loopback ports.

* :class:`OrthancServer` (:mod:`medssl.testing.orthanc`): Debian's Orthanc as the PACS, with
  its DICOMweb plugin on request;
* :class:`GatewayProcess` and :func:`gateway_config` (:mod:`medssl.testing.gateway`): a real
  ``medssl-serve`` process on a config written for it, started, killed and restarted;
* :class:`LocalTritonServer` and :func:`find_triton_env` (:mod:`medssl.testing.triton`): the
  ``tritonserver`` binary of the nvidia-pytriton wheel, serving an exported model repository.

Nothing here is used in production code paths; the tests (``tests/``) and the benchmarks
(``benchmarks/``) import it instead of keeping their own copies. Needs the ``[test]`` extra
(requests, PyYAML) and the Debian packages named by each class.
"""

from __future__ import annotations

from medssl.testing.gateway import GatewayProcess, gateway_config
from medssl.testing.orthanc import OrthancServer, free_port
from medssl.testing.triton import LocalTritonServer, find_triton_env

__all__ = [
    "GatewayProcess",
    "LocalTritonServer",
    "OrthancServer",
    "find_triton_env",
    "free_port",
    "gateway_config",
]
