"""cttrace: catches what conntrack does behind Kubernetes' back.

Importing this package never compiles or attaches anything: the kernel-facing
parts (``cttrace.sources``) are imported only by the commands that need them.
"""

__version__ = "0.1.0"
