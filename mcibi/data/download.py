"""Getting a dataset's archives and checking them against recorded checksums.

Sources are tried in the order of the spec (official first, then the public mirror). An archive is first
downloaded to ``<name>.part`` (resumed with an HTTP Range request after an interruption, with a tqdm progress
bar), then checked; only a file that passes is renamed to its final name, so a failed or corrupt archive is
never extracted nor marked done. Archives placed by hand in the download folder are used as they are (after
the same checks). CityScapes needs an account: credentials come from ``CITYSCAPES_USERNAME`` /
``CITYSCAPES_PASSWORD`` or a ``~/.netrc`` entry for ``www.cityscapes-dataset.com``; the official
``cityscapesscripts`` downloader is used when it is installed, otherwise the same protocol is spoken here.
For ``demo`` the "download" is the deterministic generator.

Whatever its checksum, an archive whose members would land outside its folder (absolute names, ``..``, links,
devices) is refused here already, before ``prepare`` extracts anything (:func:`mcibi.data.archives.check_members`).
An archive without a published checksum is compared with the sha256 it had when first verified
(:class:`FirstSeen`, ``data/<dataset>.checksums.json`` for the CLI).
"""

from __future__ import annotations

import hashlib
import json
import logging
import netrc
import os
import shutil
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import requests
import urllib3
from tqdm import tqdm

from mcibi.data.archives import PreparedDataError, check_members
from mcibi.data.lookup import resolve
from mcibi.data.specs import Archive, DatasetSpec, Source
from mcibi.data.synthetic import generate_archive, sha256_file
from mcibi.files import write_json

log = logging.getLogger(__name__)

CITYSCAPES_SITE = "https://www.cityscapes-dataset.com"
CHUNK = 1 << 20
SOURCE_FILE = "source.txt"  # which source delivered the archives in a download folder
UrlMap = Callable[[str], str]


class ArchiveError(RuntimeError):
    """An archive is missing, cannot be fetched or does not match its recorded checksum."""


class _Retryable(Exception):
    """A transfer broke off or came back short; resuming may help."""


# ------------------------------------------------------------------------------------------------ verification
def checksums(path: str | Path) -> dict[str, str]:
    """sha256, sha1 and md5 of a file in one pass."""
    hashes = {"sha256": hashlib.sha256(), "sha1": hashlib.sha1(), "md5": hashlib.md5()}
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            for h in hashes.values():
                h.update(block)
    return {k: h.hexdigest() for k, h in hashes.items()}


def _members(path: Path, read: bool) -> None:
    """Refuse an unsafe archive (a member outside its root, a link, a device) before anything extracts it; with
    ``read`` also test its own CRCs (zip members, gzip stream), for archives without a published checksum."""
    try:
        check_members(path, read)
    except PreparedDataError as exc:
        raise ArchiveError(exc.args[0]) from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"{path}: not a readable archive ({exc}); it is corrupt or incomplete.") from exc


# ----------------------------------------------------------------------------------------------- first-seen sha256
class FirstSeen:
    """The sha256 of every archive without a published checksum, as it was when first verified (a JSON file).

    Nothing published can confirm such an archive (the mirror's, LIP's, COCO-Stuff's), so the first verified copy
    becomes the reference: a later file under the same name from the same source is refused unless it has the same
    bytes. The CLI and the workflow keep the file at ``data/<dataset>.checksums.json``, which ``data.dvc`` tracks:
    ``dvc push`` shares it with the prepared data and another clone's ``dvc pull`` brings it back, so every clone
    refuses a file that differs from the one the team first verified.
    """

    def __init__(self, path: str | Path, dataset: str) -> None:
        self.path = Path(path)
        self.dataset = dataset

    def _load(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())["archives"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ArchiveError(f"{self.path}: not a readable checksum record ({exc}). Restore it (dvc checkout) "
                               "or delete it to record the archives anew.") from None

    def check(self, path: Path, source: str, name: str, sums: dict, size: int) -> str:
        """Compare a verified file with its first-seen sha256, recording it when there is none; say which."""
        key = f"{source}/{name}"
        path = path.with_name(name)  # a download is checked as <name>.part: name the file it becomes
        archives = self._load()
        known = archives.get(key)
        if known is None:
            archives[key] = {"sha256": sums["sha256"], "size": size,
                             "first_verified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_json(self.path, {"dataset": self.dataset, "about": FIRST_SEEN_ABOUT, "archives": archives})
            log.info("%s: sha256 %s recorded in %s (the reference for later downloads of %s)", path, sums["sha256"],
                     self.path, name)
            return f"sha256 recorded in {self.path} as the reference"
        if known.get("sha256") != sums["sha256"]:
            raise ArchiveError(
                f"{path}: sha256 {sums['sha256']} ({size} bytes) differs from the sha256 {known.get('sha256')} "
                f"({known.get('size')} bytes) recorded for the {source} archive {name} when it was first verified "
                f"({known.get('first_verified', 'date unknown')}, {self.path}). No checksum is published for it, so "
                "that first copy is the reference: this is a different file. If the upstream file legitimately "
                f"changed, delete the entry '{key}' from {self.path} and run again (then commit the new record: "
                "`dvc commit data.dvc`, `dvc push`, `git add data.dvc`); otherwise keep the record and get the file "
                "again or from elsewhere."
            )
        return f"sha256 matches the one recorded in {self.path} on {known.get('first_verified', '?')}"


FIRST_SEEN_ABOUT = ("sha256 of archives without a published checksum, recorded when each was first verified; a later "
                    "file of the same source and name with other bytes is refused. If an upstream file legitimately "
                    "changed, delete its entry and run again.")


def check_archive(path: str | Path, archive: Archive, extra_md5: str | None = None, *,
                  first_seen: FirstSeen | None = None, source: str = "") -> dict:
    """Check one complete file against what is recorded for it; return its record, raise ArchiveError if wrong.

    The strongest recorded check decides: sha256, else the published sha1/md5 (and an md5 announced by the
    server, CityScapes), else the size; an archive with none of them gets its internal CRCs tested and, with
    ``first_seen``, is compared with (or becomes) the sha256 first seen for it. Every archive's members are checked
    before anything extracts it (:func:`mcibi.data.archives.check_members`).
    """
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"{path}: missing.")
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        raise ArchiveError(f"{path}: {size} bytes, the recorded size is {archive.size}: incomplete or wrong file.")
    sums = checksums(path)
    expected = {"sha256": archive.sha256, "sha1": archive.sha1, "md5": archive.md5}
    if extra_md5 and not archive.md5:
        expected["md5"] = extra_md5
    checked = [k for k, v in expected.items() if v]
    for kind in checked:
        if sums[kind] != expected[kind].lower():
            raise ArchiveError(
                f"{path}: {kind} {sums[kind]} does not match the recorded {expected[kind]}. The file is corrupt or "
                f"incomplete: delete it and download again."
            )
    _members(path, read=not checked)
    if not checked:
        how = "size" if archive.size is not None else "archive CRCs only (no checksum published)"
        if first_seen is not None:
            how += "; " + first_seen.check(path, source, archive.name, sums, size)
        log.warning("%s: no checksum recorded for this archive; checked %s. sha256 %s", path, how, sums["sha256"])
    else:
        how = "+".join(checked)
    return {"sha256": sums["sha256"], "size": size, "verified": bool(checked), "checked_with": how}


# ----------------------------------------------------------------------------------------------------- transfer
def fetch(url: str, target: Path, http: requests.Session | None = None, retries: int = 4,
          retry_delay: float = 2.0, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``target.part``, resuming with a Range request; return the complete ``.part`` file.

    A transfer that breaks off is resumed from the bytes already on disk (also across runs). HTTP errors such as
    404 and a web page where a file was expected are not retried.
    """
    http = http or requests.Session()
    part = target.with_name(target.name + ".part")
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "mcibi-downloader", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with http.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True) as resp:
                if resp.status_code == 416 and have:
                    return part  # the part file already holds the whole file
                if resp.status_code >= 400:
                    raise ArchiveError(f"{url}: HTTP {resp.status_code} {resp.reason}")
                if "text/html" in resp.headers.get("Content-Type", ""):
                    raise ArchiveError(f"{url}: the server sent a web page instead of the file (login, quota or "
                                       "confirmation page)")
                if have and resp.status_code == 206:
                    start = int(resp.headers.get("Content-Range", "bytes 0-").split()[1].split("-")[0])
                    if start != have:
                        raise ArchiveError(f"{url}: server resumed at byte {start}, expected {have}")
                    mode = "ab"
                else:
                    have, mode = 0, "wb"  # no range support: start again
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, mode) as fh, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                  unit_divisor=1024, desc=target.name, mininterval=1.0) as bar:
                    # read1 hands over whatever arrived, so bytes received before a break are kept for resuming
                    while chunk := resp.raw.read1(CHUNK):
                        fh.write(chunk)
                        bar.update(len(chunk))
            got = part.stat().st_size
            if total is not None and got != total:
                raise _Retryable(f"{url}: transfer ended at {got} of {total} bytes")
            return part
        except (_Retryable, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                urllib3.exceptions.HTTPError) as exc:
            if attempt == retries:
                raise ArchiveError(f"{url}: transfer failed {retries + 1} times ({exc}); run again to resume "
                                   f"from {part}") from exc
            log.warning("%s: %s; resuming (attempt %d of %d)", url, exc, attempt + 2, retries + 1)
            time.sleep(retry_delay * (attempt + 1))
    raise AssertionError("unreachable")


def _fetch_archive(archive: Archive, dest: Path, url_map: UrlMap, http: requests.Session,
                   retry_delay: float) -> Path:
    """Fetch one archive from its URLs in order (joining multi-volume mirrors); return the unverified file."""
    errors = []
    for url in archive.urls:
        url = url_map(url)
        try:
            if not archive.parts:
                return fetch(url, dest / archive.name, http, retry_delay=retry_delay)
            volumes = [fetch(f"{url}.{i:03d}", dest / f"{archive.name}.{i:03d}", http, retry_delay=retry_delay)
                       for i in range(1, archive.parts + 1)]
            joined = dest / f"{archive.name}.part"
            with open(joined, "wb") as out:
                for vol in volumes:
                    with open(vol, "rb") as fh:
                        shutil.copyfileobj(fh, out, CHUNK)
            for vol in volumes:
                vol.unlink()
            return joined
        except (ArchiveError, requests.RequestException) as exc:
            errors.append(str(exc))
            log.warning("%s", exc)
    raise ArchiveError("; ".join(errors) or f"{archive.name}: no download URL")


def _accept(part: Path, final: Path, archive: Archive, extra_md5: str | None = None, *,
            first_seen: FirstSeen | None = None, source: str = "") -> dict:
    """Check a downloaded file; rename it into place if it passes, delete it if it does not."""
    try:
        record = check_archive(part, archive, extra_md5, first_seen=first_seen, source=source)
    except ArchiveError as exc:
        part.unlink(missing_ok=True)
        raise ArchiveError(f"{exc.args[0]} (the downloaded file was deleted)") from None
    os.replace(part, final)
    return record


# ---------------------------------------------------------------------------------------------------- CityScapes
def cityscapes_credentials() -> tuple[str, str] | None:
    """(user, password) from CITYSCAPES_USERNAME/CITYSCAPES_PASSWORD, else ~/.netrc; None if neither is set."""
    user, password = os.environ.get("CITYSCAPES_USERNAME"), os.environ.get("CITYSCAPES_PASSWORD")
    if user and password:
        return user, password
    try:
        auth = netrc.netrc().authenticators("www.cityscapes-dataset.com")
    except (FileNotFoundError, netrc.NetrcParseError):
        auth = None
    if auth and auth[0] and auth[2]:
        return auth[0], auth[2]
    return None


def cityscapes_login(user: str, password: str, site: str = CITYSCAPES_SITE) -> requests.Session:
    """Log in like cityscapesScripts' downloader (a redirect means success) and return its HTTP client."""
    http = requests.Session()
    http.get(f"{site}/login", allow_redirects=False, timeout=60).raise_for_status()
    resp = http.post(f"{site}/login", data={"username": user, "password": password, "submit": "Login"},
                        allow_redirects=False, timeout=60)
    resp.raise_for_status()
    if resp.status_code != 302:
        raise ArchiveError(f"{site}: login as '{user}' failed (bad credentials?).")
    return http


def _fetch_cityscapes(source: Source, dest: Path, url_map: UrlMap, retry_delay: float,
                      first_seen: FirstSeen | None = None) -> dict:
    creds = cityscapes_credentials()
    if creds is None:
        raise ArchiveError("no CityScapes credentials (set CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD, or add "
                           "'machine www.cityscapes-dataset.com login <user> password <password>' to ~/.netrc)")
    site = url_map(CITYSCAPES_SITE).rstrip("/")
    http = cityscapes_login(*creds, site=site)
    try:
        from cityscapesscripts.download import downloader as official
    except ImportError:
        official = None
    records = {}
    for archive in source.archives:
        final = dest / archive.name
        if official is not None and site == CITYSCAPES_SITE:
            staging = dest / ".cityscapes-download"
            staging.mkdir(exist_ok=True)
            resume = (staging / archive.name).exists()
            official.download_packages(session=http, package_names=[archive.name],
                                       destination_path=str(staging), resume=resume)  # checks the site's md5
            records[archive.name] = _accept(staging / archive.name, final, archive, first_seen=first_seen,
                                            source=source.name)
            continue
        md5 = http.get(f"{site}/md5-sum/?packageID={archive.package_id}", timeout=60)
        md5.raise_for_status()
        part = fetch(f"{site}/file-handling/?packageID={archive.package_id}", final, http,
                     retry_delay=retry_delay)
        records[archive.name] = _accept(part, final, archive, extra_md5=md5.text.split()[0],
                                        first_seen=first_seen, source=source.name)
    return records


# ------------------------------------------------------------------------------------------------------- public
def manual_instructions(spec: DatasetSpec, dest: Path) -> str:
    """Which files to put where to skip downloading."""
    lines = []
    for source in spec.sources:
        names = " and ".join(a.name for a in source.archives)
        where = f" from {source.homepage}" if source.homepage else ""
        lines.append(f"  - {source.name}: {names}{where}")
    return f"Alternatively put the archives of one source into {dest}/ and run again:\n" + "\n".join(lines)


def _present(source: Source, dest: Path) -> bool:
    return all((dest / a.name).is_file() for a in source.archives)


def download(dataset: str | DatasetSpec, dest_dir: str | Path, *, url_map: UrlMap | None = None,
             retry_delay: float = 2.0, checksums: str | Path | None = None) -> list[Path]:
    """Make every archive of one source of ``dataset`` present and verified in ``dest_dir``.

    Archives already there (downloaded before or placed by hand) are checked and kept. Otherwise each source
    is tried in order until one delivers all its archives. ``url_map`` rewrites URLs (tests serve a local
    copy). ``checksums`` is the :class:`FirstSeen` record of archives without a published checksum (the CLI's
    ``data/<dataset>.checksums.json``): a file that differs from the one first verified is refused and deleted.
    Raises ArchiveError naming every failure and which files to place by hand.
    """
    spec = resolve(dataset)
    dest = Path(dest_dir)
    first_seen = FirstSeen(checksums, spec.name) if checksums is not None else None
    dest.mkdir(parents=True, exist_ok=True)
    url_map = url_map or (lambda url: url)
    if spec.sources[0].kind == "generated":
        archive = spec.sources[0].archives[0]
        path = dest / archive.name
        if not (path.is_file() and sha256_file(path) == archive.sha256):
            log.info("generating %s", path)
            generate_archive(path)
        return [path]
    for source in _by_preference(spec, dest):
        if _present(source, dest):
            for archive in source.archives:
                check_archive(dest / archive.name, archive, first_seen=first_seen, source=source.name)
            log.info("%s: %s archives already present and verified", spec.name, source.name)
            return [dest / a.name for a in source.archives]
    failures = []
    http = requests.Session()
    for source in spec.sources:
        try:
            if source.kind == "cityscapes":
                _fetch_cityscapes(source, dest, url_map, retry_delay, first_seen)
            else:
                for archive in source.archives:
                    final = dest / archive.name
                    if final.is_file():
                        check_archive(final, archive, first_seen=first_seen, source=source.name)
                        continue
                    if not archive.urls:
                        raise ArchiveError(f"{archive.name}: no direct download URL ({archive.note})")
                    _accept(_fetch_archive(archive, dest, url_map, http, retry_delay), final, archive,
                            first_seen=first_seen, source=source.name)
            log.info("%s: downloaded the %s archives", spec.name, source.name)
            (dest / SOURCE_FILE).write_text(source.name + "\n")
            return [dest / a.name for a in source.archives]
        except (ArchiveError, requests.RequestException) as exc:
            failures.append(f"  - {source.name}: {exc}")
            log.warning("%s: %s source failed: %s", spec.name, source.name, exc)
    raise ArchiveError(f"could not get the archives of '{spec.name}':\n" + "\n".join(failures) + "\n"
                       + manual_instructions(spec, dest))


def _by_preference(spec: DatasetSpec, dest: Path) -> list[Source]:
    """The spec's sources, the one that delivered the files in ``dest`` first (sources may share file names)."""
    marker = dest / SOURCE_FILE
    name = marker.read_text().strip() if marker.is_file() else None
    return sorted(spec.sources, key=lambda s: s.name != name)


def present_source(spec: DatasetSpec, dest: Path) -> Source:
    """The first source whose archives are all in ``dest``; ArchiveError with instructions if none is."""
    for source in _by_preference(spec, dest):
        if _present(source, dest):
            return source
    raise ArchiveError(f"{dest}: the archives of '{spec.name}' are missing. Run `mcibi download {spec.name}` "
                       f"first.\n" + manual_instructions(spec, dest))


def verify_archives(dataset: str | DatasetSpec, dest_dir: str | Path, checksums: str | Path | None = None) -> dict:
    """Check each archive of the source present in ``dest_dir``; return {dataset, source, archives: {name: ...}}.

    Each archive's record holds its sha256 and size, whether a recorded checksum confirmed it (``verified``)
    and what was checked; an archive without any recorded checksum is logged as unverified and, with
    ``checksums`` (a :class:`FirstSeen` record), compared with the sha256 first seen for it (or recorded there).
    Every archive's members are checked too: one that would write outside its folder is refused.
    """
    spec = resolve(dataset)
    dest = Path(dest_dir)
    first_seen = FirstSeen(checksums, spec.name) if checksums is not None else None
    try:
        source = present_source(spec, dest)
    except ArchiveError:
        missing = [a.name for a in spec.sources[0].archives if not (dest / a.name).is_file()]
        raise ArchiveError(f"{dest / missing[0]}: missing. Run `mcibi download {spec.name}` first.") from None
    record = {a.name: check_archive(dest / a.name, a, first_seen=first_seen, source=source.name)
              for a in source.archives}
    return {"dataset": spec.name, "source": source.name, "archives": record}
