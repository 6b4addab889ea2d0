"""The SUIT text section (suit-text, key 23): human-readable descriptions of a manifest and its
components, per language (draft-ietf-suit-manifest, "suit-text").

``SUIT_Text_Map = { + language-tag => { ? int => tstr, * component-identifier => { ? int => tstr } } }``.
Pure: :func:`encode_text` and :func:`decode_text` convert between that map and :class:`ManifestText`
values; anything outside the map's shape raises :class:`ManifestError` with the key at fault.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import ManifestError

MANIFEST_KEYS = {
    1: "manifest_description",
    2: "update_description",
    3: "manifest_json_source",
    4: "manifest_yaml_source",
}
"""suit-text-manifest-description, -update-description, -manifest-json-source, -manifest-yaml-source."""
COMPONENT_KEYS = {
    1: "vendor_name",
    2: "model_name",
    3: "vendor_domain",
    4: "model_info",
    5: "description",
    6: "version",
}
"""suit-text-vendor-name, -model-name, -vendor-domain, -model-info, -component-description,
-component-version."""
MAX_LANGUAGES = 8
_LANGUAGE_TAG = re.compile(r"[a-zA-Z]{1,8}(-[a-zA-Z0-9]{1,8})*")
"""tag38-ltag: an RFC 5646 language tag as the draft constrains it."""

ComponentId = tuple[bytes, ...]


@dataclass(frozen=True)
class ComponentText:
    """What the text section says about one component (every field optional)."""

    vendor_name: str | None = None
    model_name: str | None = None
    vendor_domain: str | None = None
    model_info: str | None = None
    description: str | None = None
    version: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}


@dataclass(frozen=True)
class ManifestText:
    """The text section in one language: about the manifest, and about each component by its id."""

    language: str = "en"
    manifest_description: str | None = None
    update_description: str | None = None
    manifest_json_source: str | None = None
    manifest_yaml_source: str | None = None
    components: tuple[tuple[ComponentId, ComponentText], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"language": self.language}
        out |= {name: v for name in MANIFEST_KEYS.values() if (v := getattr(self, name)) is not None}
        out["components"] = [
            {"component": [p.hex() for p in cid], **text.as_dict()} for cid, text in self.components
        ]
        return out


def _check_str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise ManifestError(f"{what} must be a text string")
    return v


def _strings(obj: object, keys: Mapping[int, str], what: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for key, name in keys.items():
        value = getattr(obj, name)
        if value is not None:
            out[key] = _check_str(value, f"{what} {name}")
    return out


def encode_text(texts: tuple[ManifestText, ...], component_ids: list[ComponentId]) -> dict[str, Any]:
    """The SUIT_Text_Map for ``texts`` (one entry per language); component ids must be the manifest's."""
    if len(texts) > MAX_LANGUAGES:
        raise ManifestError(f"text: at most {MAX_LANGUAGES} languages")
    out: dict[str, Any] = {}
    for text in texts:
        if not isinstance(text.language, str) or not _LANGUAGE_TAG.fullmatch(text.language):
            raise ManifestError(f"text: {text.language!r} is not a language tag")
        if text.language in out:
            raise ManifestError(f"text: language {text.language} given twice")
        lmap: dict[Any, Any] = dict(_strings(text, MANIFEST_KEYS, "text"))
        for cid, ctext in text.components:
            if cid not in component_ids:
                raise ManifestError("text: describes a component that the manifest does not have")
            if cid in lmap:
                raise ManifestError("text: a component is described twice")
            lmap[cid] = _strings(ctext, COMPONENT_KEYS, "text")
        out[text.language] = lmap
    return out


def _text_fields(m: Mapping[Any, Any], keys: Mapping[int, str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in m.items():
        if not isinstance(key, int) or isinstance(key, bool) or key not in keys:
            raise ManifestError(f"{what}: unsupported key {key!r:.40}")
        out[keys[key]] = _check_str(value, f"{what} key {key}")
    return out


def decode_text(obj: Any, component_ids: list[ComponentId]) -> tuple[ManifestText, ...]:
    """Parse a decoded SUIT_Text_Map; every component it describes must be in ``component_ids``."""
    if not isinstance(obj, Mapping) or not obj:
        raise ManifestError("text: must be a non-empty map of language tag to text map")
    if len(obj) > MAX_LANGUAGES:
        raise ManifestError(f"text: at most {MAX_LANGUAGES} languages")
    texts = []
    for language, lmap in obj.items():
        if not isinstance(language, str) or not _LANGUAGE_TAG.fullmatch(language):
            raise ManifestError(f"text: {language!r:.40} is not a language tag")
        what = f"text ({language})"
        if not isinstance(lmap, Mapping):
            raise ManifestError(f"{what}: must be a map")
        plain = {k: v for k, v in lmap.items() if not isinstance(k, tuple | list)}
        manifest_fields = _text_fields(plain, MANIFEST_KEYS, what)
        components = []
        for key, value in lmap.items():
            if not isinstance(key, tuple | list):
                continue
            cid = tuple(key)
            if cid not in component_ids:
                raise ManifestError(f"{what}: describes a component that is not in common")
            if not isinstance(value, Mapping):
                raise ManifestError(f"{what}: a component's text must be a map")
            components.append(
                (cid, ComponentText(**_text_fields(value, COMPONENT_KEYS, f"{what} component")))
            )
        components.sort(key=lambda item: component_ids.index(item[0]))
        texts.append(ManifestText(language=language, components=tuple(components), **manifest_fields))
    return tuple(texts)
