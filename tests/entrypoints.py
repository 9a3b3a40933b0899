"""
Plugins installed the entry-point way, without pip: a C{*.dist-info}
directory holding C{entry_points.txt} on a C{sys.path} entry is all
C{importlib.metadata} reads, so a temporary directory on C{sys.path} (or on
C{PYTHONPATH} for a twistd process) looks exactly like an installed
distribution whose plugins are declared under C{[project.entry-points."relay.plugins"]}.
"""

from __future__ import annotations

from pathlib import Path

# A delivery backend that files each delivered recipient under state_dir/ep-delivered/,
# so a test sees what the relay handed it.
MODULE = """
from pathlib import Path

from zope.interface import implementer

from relay.envelope import DeliveryResult, Status
from relay.interfaces import IDeliveryBackend, IDeliveryBackendFactory

OK = Status(250, "2.0.0", "filed by epfiler")


@implementer(IDeliveryBackend)
class Filer:
    def __init__(self, directory, blocking):
        self.directory = directory
        self.blocking = blocking

    def _file(self, envelope, recipients, openData):
        self.directory.mkdir(parents=True, exist_ok=True)
        with openData() as data:
            body = data.read()
        for r in recipients:
            (self.directory / f"{envelope.queue_id}-{r.address}").write_bytes(body)
        return [DeliveryResult(r.address, OK) for r in recipients]

    def deliver(self, envelope, recipients, openData):
        return self.blocking(self._file, envelope, recipients, openData)

    def stop(self):
        pass


@implementer(IDeliveryBackendFactory)
class FilerFactory:
    name = "epfiler"
    description = "Files each message under state_dir/ep-delivered (found through an entry point)"
    keys = {"directory": "where, under state_dir (default ep-delivered)"}

    def build(self, options, context):
        return Filer(context.state_dir / options.get("directory", "ep-delivered"), context.blocking)


filer = FilerFactory()
"""


def install(root: Path, distribution: str, entryPoints: dict[str, str], modules: dict[str, str] | None = None) -> Path:
    """
    Make C{root} look like a site-packages holding C{distribution} 1.0 with
    C{entryPoints} (name to C{module:attribute}) in the C{relay.plugins}
    group, and C{modules} (name to source) beside it.  Returns C{root}, the
    directory to put on C{sys.path}.
    """
    root.mkdir(parents=True, exist_ok=True)
    for name, source in (modules or {}).items():
        (root / f"{name}.py").write_text(source)
    info = root / f"{distribution}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entryPoints.items())
    (info / "entry_points.txt").write_text(f"[relay.plugins]\n{lines}")
    return root
