"""PromptBook: find, hash and render the ``prompts/*.jinja`` templates.

A template name such as ``"critique"`` is looked up as ``critique.jinja`` first in the user's
folder (when one is given), then in the built-in folder, one name at a time - so a user can
override one template and keep the rest. Templates may ``{% include %}`` / ``{% import %}``
other ``.jinja`` files from those folders by constant name (partials whose names start with
``_`` are not listed by :meth:`PromptBook.names`); nothing outside them can be reached.

``template_hash`` is the sha256 of the template file's bytes (what ``sha256sum`` prints). A
template that includes or imports others hashes its own bytes together with theirs, so editing a
shared partial also changes the hash, and with it every cache key built on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError

from rlaif.errors import ConfigError, RlaifError
from rlaif.prompts.sandbox import (
    RESERVED_NAMES,
    SnapshotLoader,
    collect_messages,
    make_environment,
)
from rlaif.prompts.slots import SlotMessages, marker, plain_names
from rlaif.resources import resource_dir

SUFFIX = ".jinja"
# One path segment of a template file name: no leading dot, no separators, no "..".
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# The tags that load another template.
_LOADS = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)


@dataclass(frozen=True)
class RenderedPrompt:
    """Chat messages made by one template, and which template source made them.

    Attributes:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
        template: the template's name, e.g. ``"critique"``.
        template_hash: sha256 hex of the template source (see the module docstring).
    """

    messages: list[dict[str, str]]
    template: str
    template_hash: str


@dataclass
class _Entry:
    """A template compiled from a snapshot of its source (and the sources it includes)."""

    path: Path
    template: Template
    hash: str
    files: dict[str, Path]  # every file name in the snapshot -> the file it was read from
    stamps: dict[Path, tuple[int, int]]  # file -> (mtime_ns, size) when it was read
    # Every path whose change could change what the lookup finds (see ``PromptBook._probe``)
    # and their ``lstat`` signatures when the entry was last found fresh; None: always check.
    probe_paths: tuple[str, ...] = ()
    probe: tuple[tuple[int, ...] | None, ...] | None = None
    # Variables every file of the snapshot only prints inside message blocks (see slots.py).
    plain: frozenset[str] = frozenset()


class PromptBook:
    """The set of templates a run renders from.

    Args:
        folder: a folder of the user's own ``*.jinja`` templates, searched before the
            built-in ones; ``None`` uses only the built-in templates.

    Raises:
        ConfigError: ``folder`` does not exist or is not a folder.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self._folders: list[Path] = []
        if folder is not None:
            user = Path(folder).expanduser()
            if not user.is_dir():
                raise ConfigError("template folder does not exist or is not a folder", file=user)
            self._folders.append(user.resolve())
        self._folders.append(resource_dir("prompts").resolve())
        self._env = make_environment()  # parses sources to find syntax errors and includes
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._pins = threading.local()  # this thread's pinned entries (see ``pinned``)

    # -- lookup ------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the renderable templates in the user and built-in folders, sorted."""
        found: set[str] = set()
        for folder in self._folders:
            for path in folder.glob(f"*{SUFFIX}"):
                stem = path.name[: -len(SUFFIX)]
                if _NAME.fullmatch(stem) and path.is_file():
                    found.add(stem)
        return sorted(found)

    def source_path(self, name: str) -> Path:
        """The file that ``name`` renders from (the user's copy when there is one).

        Raises:
            ConfigError: no template of that name.
        """
        path = self._find_file(name + SUFFIX) if _NAME.fullmatch(name) else None
        if path is None:
            looked = ", ".join(str(f) for f in self._folders)
            raise ConfigError(
                f"unknown template '{name}' (looked in {looked});"
                f" available: {', '.join(self.names()) or 'none'}",
            )
        return path

    def _find_file(self, filename: str) -> Path | None:
        """Resolve a template file name in the folders, refusing anything outside them."""
        segments = filename.split("/")
        if not filename.endswith(SUFFIX) or not all(_SEGMENT.fullmatch(s) for s in segments):
            return None
        for folder in self._folders:
            path = folder.joinpath(*segments)
            if path.is_file():
                # A symlink inside the folder must not lead out of it.
                if not path.resolve().is_relative_to(folder):
                    raise ConfigError(
                        f"template file '{filename}' links outside its folder {folder}",
                        file=path,
                    )
                return path
        return None

    # -- hashing and compiling ---------------------------------------------------------------

    def template_hash(self, name: str) -> str:
        """sha256 hex of the template's source (with any templates it includes).

        Raises:
            ConfigError: unknown template, syntax error, or an include that cannot be found.
        """
        return self._entry(name).hash

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Within the block, each template this thread renders is looked up (and its files
        checked) once: the renders of one wave all use one version of a template, without a
        file check per render. Outside any block, every lookup checks the files. Nests.
        """
        outer = getattr(self._pins, "entries", None)
        if outer is None:
            self._pins.entries = {}
        try:
            yield
        finally:
            if outer is None:
                self._pins.entries = None

    def _entry(self, name: str) -> _Entry:
        """The compiled template for ``name``, reloaded when any of its files changed (once
        per :meth:`pinned` block inside one)."""
        pins = getattr(self._pins, "entries", None)
        if pins is None:
            return self._lookup(name)
        entry = pins.get(name)
        if entry is None:
            entry = pins[name] = self._lookup(name)
        return entry

    def _lookup(self, name: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(name)
            # Fast path: one lstat per path the lookup depends on (usually one). Unchanged
            # signatures mean the full lookup below would find the same files unchanged.
            if entry and entry.probe is not None and self._probe(entry.probe_paths) == entry.probe:
                return entry
        path = self.source_path(name)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.path != path or not self._fresh(entry):
                entry = self._load(name, path)
                self._entries[name] = entry
            # Signatures first, then the full check: a file changed in between is seen as
            # stale (probe None) rather than recorded as fresh.
            probe = self._probe(entry.probe_paths)
            entry.probe = probe if probe is not None and self._fresh(entry) else None
            return entry

    def _probe_paths(self, files: dict[str, Path]) -> tuple[str, ...]:
        """The paths whose ``lstat`` decides where ``files`` are found: each file's path in
        every folder up to the one it was found in, with the sub-folders on the way."""
        paths: list[str] = []
        for filename, found in files.items():
            segments = filename.split("/")
            for folder in self._folders:
                current = str(folder)
                for segment in segments:
                    current = os.path.join(current, segment)
                    paths.append(current)
                if folder.joinpath(*segments) == found:
                    break
        return tuple(paths)

    @staticmethod
    def _probe(paths: tuple[str, ...]) -> tuple[tuple[int, ...] | None, ...] | None:
        """``lstat`` signatures of ``paths`` (None for a missing one); None when one is a
        symlink, whose target can change without its own ``lstat`` changing."""
        out: list[tuple[int, ...] | None] = []
        for path in paths:
            try:
                st = os.lstat(path)
            except OSError:
                out.append(None)
                continue
            if stat.S_ISLNK(st.st_mode):
                return None
            out.append(
                (st.st_mode, st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            )
        return tuple(out)

    def _fresh(self, entry: _Entry) -> bool:
        for filename, path in entry.files.items():
            if self._find_file(filename) != path:  # a user file now shadows it, or vice versa
                return False
            try:
                st = path.stat()
            except OSError:
                return False
            if (st.st_mtime_ns, st.st_size) != entry.stamps[path]:
                return False
        return True

    def _load(self, name: str, path: Path) -> _Entry:
        """Read the template and everything it includes once; hash and compile that snapshot."""
        top = name + SUFFIX
        sources: dict[str, tuple[str, Path]] = {}
        raw: dict[str, bytes] = {}
        stamps: dict[Path, tuple[int, int]] = {}
        trees: list[nodes.Template] = []
        pending = [(top, path)]
        while pending:
            filename, file = pending.pop()
            if filename in sources:
                continue
            try:
                st = file.stat()
                data = file.read_bytes()
                source = data.decode("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"template '{name}': cannot read template file: {exc}", file=file
                ) from exc
            stamps[file] = (st.st_mtime_ns, st.st_size)
            raw[filename], sources[filename] = data, (source, file)
            try:
                ast = self._env.parse(source, filename, str(file))
            except TemplateSyntaxError as exc:
                raise ConfigError(
                    f"template '{name}': syntax error: {exc.message}", file=file, line=exc.lineno
                ) from exc
            trees.append(ast)
            for node in ast.find_all(_LOADS):
                pending.append(self._resolve_ref(name, file, node))
        digest = hashlib.sha256(raw[top])
        if len(raw) > 1:
            # Fold in each included file by name and content, in a fixed order.
            for filename in sorted(f for f in raw if f != top):
                digest.update(b"\0" + filename.encode() + b"\0")
                digest.update(hashlib.sha256(raw[filename]).hexdigest().encode())
        env = make_environment(SnapshotLoader(sources))
        try:
            template = env.get_template(top)
        except TemplateSyntaxError as exc:  # compile-time checks that parse() does not make
            raise ConfigError(
                f"template '{name}': {exc.message}", file=exc.filename or path, line=exc.lineno
            ) from exc
        files = {filename: file for filename, (_, file) in sources.items()}
        probes = self._probe_paths(files)
        plain = plain_names(trees)
        return _Entry(path, template, digest.hexdigest(), files, stamps, probes, plain=plain)

    def _resolve_ref(self, name: str, file: Path, node: nodes.Node) -> tuple[str, Path]:
        """Check one ``include`` / ``import`` / ``extends`` target; return its name and file."""
        ref = node.template  # type: ignore[attr-defined]
        if not (isinstance(ref, nodes.Const) and isinstance(ref.value, str)):
            raise ConfigError(
                f"template '{name}': include/import/extends must name one template as a constant"
                " string, so that the template's hash covers what it loads",
                file=file,
                line=node.lineno,
            )
        target = self._find_file(ref.value)
        if target is None:
            folders = ", ".join(str(f) for f in self._folders)
            raise ConfigError(
                f"template '{name}': cannot load '{ref.value}': only '*{SUFFIX}' files inside the"
                f" template folders can be included or imported ({folders})",
                file=file,
                line=node.lineno,
            )
        if target == file:
            raise ConfigError(
                f"template '{name}': '{ref.value}' loads itself (a user template shadows the"
                " built-in one of the same name; copy what you need instead of extending it)",
                file=file,
                line=node.lineno,
            )
        return ref.value, target

    # -- rendering ---------------------------------------------------------------------------

    def render(self, name: str, **context: Any) -> RenderedPrompt:
        """Render template ``name`` with ``context`` into chat messages.

        Context values are data: they are printed as text and never interpreted as template
        code, and they cannot add, end or split a message.

        Raises:
            ConfigError: unknown template, syntax error, a variable the template needs is
                missing, the sandbox refused an operation, or the template printed text
                outside its message blocks. The message names the file and line.
            ValueError: ``context`` uses a reserved name (``message``).
        """
        clash = RESERVED_NAMES.intersection(context)
        if clash:
            raise ValueError(f"context names reserved for templates: {', '.join(sorted(clash))}")
        entry = self._entry(name)
        try:
            messages = collect_messages(entry.template, context)
        except RlaifError:
            raise
        except Exception as exc:
            # Anything raised while rendering comes from the template or the data it was given
            # (a missing key, an unsafe attribute, a bad filter argument): report it against
            # the template line that raised it.
            raise self._render_error(name, entry, exc) from exc
        return RenderedPrompt(messages=messages, template=name, template_hash=entry.hash)

    def render_many(
        self, name: str, fills: Sequence[Mapping[str, Any]], **context: Any
    ) -> list[RenderedPrompt]:
        """``[self.render(name, **context, **fill) for fill in fills]``, rendered once.

        Where the template only prints the ``fills``' variables inside message blocks and
        their values are strings, the template renders once with markers for them, which each
        fill replaces (:mod:`rlaif.prompts.slots`): the same messages at a fraction of the
        cost. Otherwise each fill is rendered in full. Errors are those of :meth:`render`.
        """
        names = list(fills[0]) if fills else []
        entry = self._entry(name)
        if (
            len(fills) < 2
            or not entry.plain.issuperset(names)
            or any(list(f) != names or any(type(v) is not str for v in f.values()) for f in fills)
            or not context.keys().isdisjoint(names)
            or RESERVED_NAMES.intersection(context)
        ):
            return [self.render(name, **context, **fill) for fill in fills]
        markers = {n: marker(k) for k, n in enumerate(names)}
        try:
            slotted = SlotMessages(collect_messages(entry.template, {**context, **markers}), names)
        except Exception:  # rendered again the ordinary way, which reports it
            return [self.render(name, **context, **fill) for fill in fills]
        return [
            RenderedPrompt(messages=slotted.fill(f), template=name, template_hash=entry.hash)
            for f in fills
        ]

    def _render_error(self, name: str, entry: _Entry, exc: Exception) -> ConfigError:
        if isinstance(exc, SecurityError):
            what = f"refused by the sandbox: {exc}"
        elif isinstance(exc, TemplateError):
            what = exc.message or type(exc).__name__
        else:
            what = f"{type(exc).__name__}: {exc}"
        # Jinja rewrites tracebacks so template frames carry the template's file and line;
        # the innermost one is where the error happened (possibly inside an included file).
        file, line = entry.path, None
        paths = {str(p): p for p in entry.files.values()}
        for frame in traceback.extract_tb(exc.__traceback__):
            if frame.filename in paths:
                file, line = paths[frame.filename], frame.lineno
        return ConfigError(f"template '{name}': {what}", file=file, line=line)
