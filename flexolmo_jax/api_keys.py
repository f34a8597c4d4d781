"""API keys for the policy server: who may call it, and which policies and experts each may use.

A keys file is JSON, written by `python -m flexolmo_jax.serve add-key` (never by hand):

  {"keys": {"alice": {"salt": hex, "hash": hex, "scrypt": {"n": 16384, "r": 8, "p": 1},
                      "policies": ["public-only", "no-news"], "experts": "public+math"}}}

A key is `<key id>.<secret>`, sent as `Authorization: Bearer <key>`; the file holds only a salted
scrypt hash of the secret (compared in constant time), so a leaked file grants nothing. "policies"
lists the named policies the key may ask for; "experts" is null when the key may not send explicit
expert lists, else the experts such a list may stay within (an expert subset,
flexolmo_jax/subsets.py).
Both are checked against the policies file and the model when the server starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import re
import secrets
from typing import Mapping, Sequence

from flexolmo_jax import atomic
from flexolmo_jax import policies as policies_lib

KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Interactive-login scrypt cost; each entry stores its own, so a new default keeps old keys valid.
SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_CACHE_SIZE = 1024


class KeysError(ValueError):
  """A keys file, or a key entry, that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Grant:
  """What one key may do: the named policies it may use, and the experts an explicit expert list
  may stay within (None: explicit lists refused)."""
  key_id: str
  policies: frozenset[str]
  experts: frozenset[str] | None


def _hash(secret: str, salt: bytes, cost: Mapping[str, int]) -> bytes:
  return hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=cost["n"], r=cost["r"],
                        p=cost["p"], dklen=32)


def new_entry(policies: Sequence[str], experts: str | None) -> tuple[str, dict]:
  """(secret, file entry) of a new key; the secret is shown once and never stored."""
  secret = secrets.token_urlsafe(32)
  salt = secrets.token_bytes(16)
  return secret, {"salt": salt.hex(), "hash": _hash(secret, salt, SCRYPT).hex(),
                  "scrypt": dict(SCRYPT), "policies": list(policies), "experts": experts}


def add_key(path: str | os.PathLike, key_id: str, policies: Sequence[str],
            experts: str | None) -> str:
  """Adds a key to the keys file at `path` (created, mode 0600, if absent; replaced atomically)
  and returns the full key `<key id>.<secret>`."""
  if not KEY_ID.fullmatch(key_id):
    raise KeysError(f"key id {key_id!r} must be 1-64 letters, digits, '_' or '-'")
  if not policies and experts is None:
    raise KeysError("a key that may use no policy and no explicit experts grants nothing; pass "
                    "--key_policies and/or --key_experts")
  data = _read(path) if os.path.exists(path) else {"keys": {}}
  if key_id in data["keys"]:
    raise KeysError(f"{path}: key id {key_id!r} exists already; choose another id")
  secret, data["keys"][key_id] = new_entry(policies, experts)
  owner_only = lambda name, flags: os.open(name, flags, 0o600)  # A secret's hash: mode 0600.
  with atomic.replacing(path, "w", encoding="utf-8", opener=owner_only) as f:
    json.dump(data, f, indent=1, sort_keys=True)
  return f"{key_id}.{secret}"


def _read(path) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as err:
    raise KeysError(f"{path}: not valid JSON ({err})") from None
  if not isinstance(data, dict) or set(data) != {"keys"} or not isinstance(data["keys"], dict):
    raise KeysError(f'{path}: a keys file holds exactly {{"keys": {{key id: entry}}}}; create it '
                    f"with `python -m flexolmo_jax.serve add-key`")
  return data


class Keys:
  """The keys of a keys file, validated against the served policies and experts."""

  def __init__(self, path: str | os.PathLike, policies: Mapping[str, tuple[str, ...]],
               expert_names: Sequence[str]):
    self.entries: dict[str, tuple[bytes, bytes, dict]] = {}
    self.grants: dict[str, Grant] = {}
    for key_id, e in _read(path)["keys"].items():
      where = f"{path}: key {key_id!r}"
      try:
        salt, digest, cost = bytes.fromhex(e["salt"]), bytes.fromhex(e["hash"]), e["scrypt"]
        granted = list(e["policies"])
        experts = e["experts"]
      except (KeyError, TypeError, ValueError, AttributeError):
        raise KeysError(f"{where}: not an entry written by add-key (salt, hash, scrypt, policies, "
                        f"experts); recreate it") from None
      unknown = sorted(set(granted) - set(policies))
      if unknown:
        raise KeysError(f"{where}: unknown policies {unknown}; the policies file has "
                        f"{sorted(policies)}")
      if experts is not None:
        experts = frozenset(policies_lib.check_experts(experts, expert_names, where))
      self.entries[key_id] = (salt, digest, cost)
      self.grants[key_id] = Grant(key_id, frozenset(granted), experts)
    if not self.grants:
      raise KeysError(f"{path}: no keys; add one with `python -m flexolmo_jax.serve add-key`")
    self._verified: dict[bytes, str] = {}  # sha256 of a key that matched -> its key id

  def authenticate(self, authorization: str | None) -> Grant | None:
    """The grant of the `Authorization` header's bearer key, or None if missing or wrong.
    Slow (one scrypt) the first time a key is seen; call it off the event loop."""
    if not authorization or not authorization.startswith("Bearer "):
      return None
    token = authorization[len("Bearer "):].strip()
    fingerprint = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
    if fingerprint in self._verified:
      return self.grants[self._verified[fingerprint]]
    key_id, _, secret = token.partition(".")
    if key_id not in self.entries or not secret:
      return None
    salt, digest, cost = self.entries[key_id]
    if not hmac.compare_digest(_hash(secret, salt, cost), digest):
      return None
    if len(self._verified) >= _CACHE_SIZE:
      self._verified.clear()
    self._verified[fingerprint] = key_id
    return self.grants[key_id]
