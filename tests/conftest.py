"""Test-wide fixtures; this directory is on sys.path for the helpers beside it."""

from certs import pki  # noqa: F401 -- a fixture, used by name
from pgcluster import pgcluster  # noqa: F401 -- a fixture, used by name
from relayproc import relay  # noqa: F401 -- a fixture, used by name
