"""PEP 517 build backend: setuptools plus a start-up hook for ``recipes``.

Every hook is setuptools' own. ``build_wheel`` and ``build_editable`` then add
``ttt_omni_recipes_hook.py`` and a ``.pth`` that imports it at the root of the
wheel, so both ``pip install .`` and ``pip install -e .`` put them in
site-packages; see that module for why it exists. The hook module is shipped
inside the wheel in both modes, so it does not depend on the editable finder
or on the order in which ``site`` reads ``.pth`` files.

setuptools cannot do this itself: files from ``build_py`` never reach an
editable wheel, and ``data-files`` install relative to the prefix, not to
site-packages.
"""

import base64
import csv
import hashlib
import io
import os
import zipfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (re-export every hook)

_HOOK_SOURCE = Path(__file__).with_name("ttt_omni_recipes_hook.py")
_PTH_NAME = "ttt_omni_recipes_hook.pth"
# site runs .pth lines that begin with "import" at interpreter start-up.
_PTH_TEXT = b"import ttt_omni_recipes_hook\n"
# Fixed timestamp (the zip epoch) so the added entries build reproducibly.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    """setuptools' ``build_wheel`` with the recipes hook added to the wheel."""
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    _add_recipes_hook(os.path.join(wheel_directory, name))
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    """setuptools' ``build_editable`` with the recipes hook added to the wheel."""
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    _add_recipes_hook(os.path.join(wheel_directory, name))
    return name


def _record_hash(data):
    """Returns a RECORD hash field: urlsafe base64 sha256 without padding."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode("ascii")


def _added_entry(name):
    """Returns the ZipInfo of a file this backend adds (rw-r--r--, deflated)."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.external_attr = 0o100644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _add_recipes_hook(wheel_path):
    """Adds the hook module and its ``.pth`` to a wheel and rewrites its RECORD.

    Args:
        wheel_path (str): path of the wheel setuptools built; replaced in place.

    Raises:
        RuntimeError: if the wheel has no RECORD or already holds the hook files.
    """
    added = {
        _HOOK_SOURCE.name: _HOOK_SOURCE.read_bytes(),
        _PTH_NAME: _PTH_TEXT,
    }
    with zipfile.ZipFile(wheel_path) as wheel:
        entries = [(info, wheel.read(info)) for info in wheel.infolist()]
    names = [info.filename for info, _ in entries]
    records = [n for n in names if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    if len(records) != 1 or set(added) & set(names):
        raise RuntimeError(f"unexpected wheel layout in {wheel_path}: {names}")
    record_name = records[0]
    dist_info = record_name.split("/")[0] + "/"

    # The wheel spec asks for .dist-info last and RECORD as its last file, so
    # the new files go before the metadata and RECORD is rebuilt from scratch.
    metadata = [(i, d) for i, d in entries if i.filename.startswith(dist_info)]
    body = [(i, d) for i, d in entries if not i.filename.startswith(dist_info)]
    body += [(_added_entry(name), data) for name, data in added.items()]
    body += [(i, d) for i, d in metadata if i.filename != record_name]

    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for info, data in body:
        if not info.is_dir():
            writer.writerow([info.filename, _record_hash(data), len(data)])
    writer.writerow([record_name, "", ""])

    record_info = next(i for i, _ in metadata if i.filename == record_name)
    tmp_path = wheel_path + ".tmp"
    with zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_DEFLATED) as out:
        for info, data in body:
            out.writestr(info, data)
        out.writestr(record_info, record.getvalue().encode("utf-8"))
    os.replace(tmp_path, wheel_path)
