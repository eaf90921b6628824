"""A lease on one registered model's aliases: one promotion (or rollback) of a model at a time.

    with PromotionLease(tracking_uri, "ads-relevance", ttl_s=60, wait_s=900) as lease:
        champion = ...; gate ...           # the lease is renewed in the background meanwhile
        lease.check()                      # LeaseLost unless it is still safely held
        ... move the aliases ...

MLflow has no compare-and-set, so the lease is built from the registry operations that are atomic in every
MLflow store (a unique name in the SQL stores, the same through ``mlflow server``):

* ``create_registered_model(name)`` fails with RESOURCE_ALREADY_EXISTS when the name exists;
* ``rename_registered_model(old, new)`` fails when ``old`` is gone or ``new`` exists.

The lease of model ``M`` is the registered model ``M.promotion-lease`` (``lease_name``), created with its
holder in tags: ``lease.owner`` (who@host:pid), ``lease.token`` (random, one per holding),
``lease.acquired`` and ``lease.expires`` (UTC epoch seconds). Acquiring is creating it. The holder renews
``lease.expires`` to now + ttl every ttl/4 in a background thread; releasing deletes it.

A promoter that was killed leaves its lease behind. Once ``lease.expires`` has passed, a waiting promoter
takes it over by renaming the lease to ``M.promotion-lease.expired.<its token>`` and then creating a fresh
one. Of all promoters that saw the same expired holding, exactly one rename succeeds (the name with that
token exists afterwards), and a late rename can never remove a newer holding: the tombstone name of the
old token is taken, so the rename fails. Tombstones stay in the registry as the record of a lapsed
holding (who held it, since when); each one is a killed or hung promoter, so there are few.

The holder trusts its lease only until ttl/2 after the start of its last successful renewal (a monotonic
clock), while others take it over only ttl after it. ``check()`` (called right before the aliases move)
refuses a lease past that point, or one whose token is no longer its own. The half ttl between the two is
the safety margin, and the limits of the design: the holder's and the others' clocks must agree to within
it, and a promoter must not stall between ``check()`` and its last alias write for longer than it. A
paused process (SIGSTOP, swap storm) that resumes after ttl/2 finds ``check()`` failing, but one paused
exactly between the check and the writes is not detected. Anything that moves aliases without the lease
(the MLflow UI, another tool) is not excluded at all: the promotion gate therefore re-reads the champion
after the gate and gates again when it moved (monitoring.promote).
"""
from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid

from mlflow.exceptions import MlflowException

from kernel.errors import LeaseBusy, LeaseLost
from serving.registry.aliases import registry_client, who

LEASE_SUFFIX = ".promotion-lease"
OWNER, TOKEN, ACQUIRED, EXPIRES = "lease.owner", "lease.token", "lease.acquired", "lease.expires"


def lease_name(model: str) -> str:
    return model + LEASE_SUFFIX


def tombstone_name(model: str, token: str) -> str:
    return f"{lease_name(model)}.expired.{token}"


def _code(e: MlflowException) -> str:
    return str(getattr(e, "error_code", ""))


class PromotionLease:
    """The lease of registered model ``model`` (see the module docstring). ``ttl_s``: how long a holding
    lasts without renewal; ``wait_s``: how long ``acquire`` waits for another holder (LeaseBusy after)."""

    def __init__(self, tracking_uri: str, model: str, ttl_s: float = 60.0, wait_s: float = 900.0,
                 poll_s: float = 0.5):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.uri, self.model, self.name = tracking_uri, model, lease_name(model)
        self.ttl_s, self.wait_s, self.poll_s = ttl_s, wait_s, poll_s
        self.token = uuid.uuid4().hex
        self.owner = f"{who()}@{socket.gethostname()}:{os.getpid()}"
        self.took_over: list[dict] = []  # the expired holdings this one replaced (their tags)
        self._client = registry_client(tracking_uri)
        self._trusted_until = 0.0  # monotonic: the holder's own view of its lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    # --- acquire / release ----------------------------------------------------------------------------

    def acquire(self) -> "PromotionLease":
        deadline = time.monotonic() + self.wait_s
        while True:
            if self._try_create():
                self._thread = threading.Thread(target=self._renew_loop, name="promotion-lease", daemon=True)
                self._thread.start()
                return self
            holder = self._holder()
            if holder is not None and float(holder.get(EXPIRES, 0)) < time.time():
                self._take_over(holder)
                continue
            if time.monotonic() > deadline:
                who_holds = holder.get(OWNER, "?") if holder else "?"
                raise LeaseBusy(f"registered model {self.model!r}: another promotion holds its lease {self.name!r} "
                                f"({who_holds}, expires {holder.get(EXPIRES, '?') if holder else '?'}); waited "
                                f"{self.wait_s:g} s (monitoring.promotion_wait_s)")
            time.sleep(self.poll_s * (0.5 + random.random()))

    def _try_create(self) -> bool:
        start = time.monotonic()
        now = time.time()
        tags = {OWNER: self.owner, TOKEN: self.token, ACQUIRED: f"{now:.3f}", EXPIRES: f"{now + self.ttl_s:.3f}"}
        try:
            self._client.create_registered_model(
                self.name, tags=tags, description=f"Promotion lease of {self.model} (serving.registry.lease): "
                                                  f"held by {self.owner}. Deleted when released.")
        except MlflowException as e:
            if _code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
            if (self._holder() or {}).get(TOKEN) != self.token:  # else: ours, retried after a lost answer
                return False
        self._trusted_until = start + self.ttl_s / 2
        return True

    def _holder(self) -> dict | None:
        """The current holding's tags, or None when there is none (released in the meantime)."""
        try:
            return dict(self._client.get_registered_model(self.name).tags)
        except MlflowException as e:
            if _code(e) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _take_over(self, holder: dict) -> None:
        """Retire an expired holding: rename it to its token's tombstone (one renamer wins per token)."""
        token = holder.get(TOKEN) or "untokened"
        try:
            self._client.rename_registered_model(self.name, tombstone_name(self.model, token))
        except MlflowException as e:
            if _code(e) in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                return  # another waiter retired it first, or it was released
            raise
        self.took_over.append(holder)

    def release(self) -> None:
        """Stop renewing; delete the lease if it is still this holding's and still trusted (otherwise it
        expires on its own: deleting a lease that may have been taken over could remove the next holder's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._lost is None and time.monotonic() < self._trusted_until:
            try:
                if (self._holder() or {}).get(TOKEN) == self.token:
                    self._client.delete_registered_model(self.name)
            except MlflowException:
                pass  # left to expire

    def __enter__(self) -> "PromotionLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # --- while held -----------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise LeaseLost unless this holding is still trusted and the registry still names it."""
        if self._lost is None and time.monotonic() >= self._trusted_until:
            self._lost = f"not renewed within {self.ttl_s / 2:g} s (half of monitoring.promotion_lease_s)"
        if self._lost is None:
            holder = self._holder()
            if (holder or {}).get(TOKEN) != self.token:
                self._lost = f"it is now held by {(holder or {}).get(OWNER, 'nobody')}"
        if self._lost is not None:
            raise LeaseLost(f"registered model {self.model!r}: this promotion lost its lease {self.name!r} "
                            f"({self._lost}); nothing was moved, rerun it")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            if time.monotonic() >= self._trusted_until:
                self._lost = self._lost or "not renewed in time"
                return
            start = time.monotonic()
            try:
                holder = self._holder()
                if (holder or {}).get(TOKEN) != self.token:
                    self._lost = f"it is now held by {(holder or {}).get(OWNER, 'nobody')}"
                    return
                self._client.set_registered_model_tag(self.name, EXPIRES, f"{time.time() + self.ttl_s:.3f}")
            except Exception:  # noqa: BLE001 - the registry did not answer: try again; the lease lapses by itself
                continue
            self._trusted_until = start + self.ttl_s / 2
