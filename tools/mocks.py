"""The one mocks module: runs Pulumi code with no engine, no account and no CLI.

The offline plan and the tests both use `run_program` / `run_function`: every resource the
code registers is recorded (type, name, parent, inputs, options) and answered with the outputs
DigitalOcean would give (ids, IPs, URIs), so what the plan shows is what the tests assert on.
"""

from __future__ import annotations

import hashlib
import re
import runpy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc
from pulumi.runtime.sync_await import _sync_await

from components import contract
from components.settings import stack_config, stack_name

PROJECT = "webstack"
ROOT = Path(__file__).resolve().parent.parent
DATABASE_CA = Path(__file__).with_name("database-ca.example.pem")
"""What `getDatabaseCa` answers: the example certificate of DigitalOcean's API reference
(openapi@7c1300c4 specification/resources/databases/models/ca.yml, base64-decoded)."""
_SECRET_SIG = rpc._special_sig_key
_SECRET_VALUE = rpc._special_secret_sig


def _fake_ip(name: str, private: bool) -> str:
    n = int(hashlib.sha256(name.encode()).hexdigest(), 16)
    if private:
        return f"10.20.{n % 15}.{(n >> 8) % 250 + 2}"
    return f"203.0.113.{(n >> 8) % 250 + 2}"  # TEST-NET-3: documentation addresses


def _uuid(name: str) -> str:
    h = hashlib.sha256(name.encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def mock_outputs(typ: str, name: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """What DigitalOcean returns for a resource, beyond its inputs (camelCase, as on the wire)."""
    uid = _uuid(f"{typ}/{name}")
    if typ == "digitalocean:index/droplet:Droplet":
        droplet_id = str(int(uid[:8], 16))  # DigitalOcean droplet ids are integers
        return {"id": droplet_id, "ipv4Address": _fake_ip(name, False),
                "ipv4AddressPrivate": _fake_ip(name, True),
                "dropletUrn": f"do:droplet:{droplet_id}", "status": "active"}
    if typ == "digitalocean:index/loadBalancer:LoadBalancer":
        return {"ip": _fake_ip(name, False), "status": "active",
                "loadBalancerUrn": f"do:loadbalancer:{uid}"}
    if typ == "digitalocean:index/reservedIp:ReservedIp":
        ip = _fake_ip(name, False)
        # As the provider computes it (godo ReservedIP.URN()); the Projects API stores the IP as
        # do:floatingip:IP instead (terraform-provider-digitalocean #1031).
        return {"ipAddress": ip, "reservedIpUrn": f"do:reservedip:{ip}"}
    if typ == "digitalocean:index/vpc:Vpc":
        return {"ipRange": inputs.get("ipRange") or "10.20.0.0/20", "urn": f"do:vpc:{uid}"}
    if typ == "digitalocean:index/databaseCluster:DatabaseCluster":
        host = f"{name}-do-user-1.db.ondigitalocean.com"
        return {
            "host": host, "privateHost": f"private-{host}", "port": 25060,
            "database": "defaultdb", "user": "doadmin", "password": "mock-doadmin-password",
            "uri": f"postgresql://doadmin:mock-doadmin-password@{host}:25060/defaultdb",
            "privateUri": "postgresql://doadmin:mock-doadmin-password@private-"
                          f"{host}:25060/defaultdb?sslmode=require",
            "clusterUrn": f"do:dbaas:{uid}",
        }
    if typ == "digitalocean:index/databaseReplica:DatabaseReplica":
        host = f"{name}-do-user-1.db.ondigitalocean.com"
        return {
            "uuid": uid, "host": host, "privateHost": f"private-{host}", "port": 25060,
            "database": "defaultdb", "user": "doadmin", "password": "mock-doadmin-password",
            "uri": f"postgresql://doadmin:mock-doadmin-password@{host}:25060/defaultdb",
            "privateUri": "postgresql://doadmin:mock-doadmin-password@private-"
                          f"{host}:25060/defaultdb?sslmode=require",
        }
    if typ == "digitalocean:index/databaseUser:DatabaseUser":
        return {"password": f"mock-{name}-password", "role": "normal"}
    if typ == "digitalocean:index/databaseConnectionPool:DatabaseConnectionPool":
        host = f"{name}-do-user-1.db.ondigitalocean.com"
        user, db = inputs.get("user", "app"), inputs.get("dbName", "app")
        pool = inputs.get("name", name)  # clients name the pool, not the database
        uri = f"postgresql://{user}:mock-pool-password@{{h}}:25061/{pool}?sslmode=require"
        return {"host": host, "privateHost": f"private-{host}", "port": 25061,
                "password": "mock-pool-password", "uri": uri.format(h=host),
                "privateUri": uri.format(h=f"private-{host}"), "dbName": db}
    if typ == "digitalocean:index/certificate:Certificate":
        # Pulumi auto-names a certificate without `name` (the resource name + a random suffix).
        return {"name": inputs.get("name") or f"{name}-{uid[:7]}",
                "uuid": uid, "state": "verified", "sha1Fingerprint": hashlib.sha1(
            name.encode()).hexdigest()}
    if typ == "digitalocean:index/uptimeCheck:UptimeCheck":
        return {"id": uid}
    if typ == "digitalocean:index/monitorAlert:MonitorAlert":
        return {"uuid": uid}
    if typ == "digitalocean:index/dnsRecord:DnsRecord":
        return {"fqdn": f"{inputs.get('name')}.{inputs.get('domain')}"}
    if typ == "random:index/randomPassword:RandomPassword":
        return {"result": "mock-" + hashlib.sha256(name.encode()).hexdigest()[:40]}
    if typ == "digitalocean:index/project:Project":
        return {"ownerUuid": uid}
    return {}


def mock_call(token: str, args: Mapping[str, Any], *,
              database_ca: Path = DATABASE_CA) -> dict[str, Any]:
    """Answers provider invokes (cloud look-ups) as DigitalOcean would for an existing account;
    `database_ca` is the PEM file `getDatabaseCa` answers with."""
    found = contract.violations(token, token, args)
    if found:
        raise contract.ContractError(str(found[0]))
    if token == "digitalocean:index/getSshKey:getSshKey":
        name = args["name"]
        digest = hashlib.md5(name.encode()).hexdigest()
        fingerprint = ":".join(digest[i:i + 2] for i in range(0, 32, 2))
        return {"id": int(digest[:6], 16), "name": name, "fingerprint": fingerprint,
                "publicKey": f"ssh-ed25519 AAAAmock {name}"}
    if token == "digitalocean:index/getDomain:getDomain":
        return {"id": args["name"], "name": args["name"], "ttl": 1800, "urn": "do:domain:x"}
    if token == "digitalocean:index/getDatabaseCluster:getDatabaseCluster":
        # The account holds the clusters this program names (auto-named from the logical
        # name); for any other name the provider returns no id (datasource_database_cluster.go).
        name = args["name"]
        if not OWN_CLUSTER.match(name):
            return {"name": name}
        return {"id": _uuid(name), "name": name, "engine": "pg"}
    if token == "digitalocean:index/getDatabaseCa:getDatabaseCa":
        return {"id": args["clusterId"], "clusterId": args["clusterId"],
                "certificate": database_ca.read_text()}
    if token == "digitalocean:index/getDatabaseUser:getDatabaseUser":
        # The user a restored cluster's backup holds.
        return {"clusterId": args["clusterId"], "name": args["name"], "role": "normal",
                "password": f"mock-restored-{args['name']}-password"}
    raise NotImplementedError(f"the mocks do not answer the invoke {token}; add it here")


OWN_CLUSTER = re.compile(r"^[a-z0-9-]+-db(-r\d+)?-cluster(-[a-z0-9]{7})?$")
"""The names of the clusters components/database.py registers (logical name + Pulumi's suffix)."""


@dataclass
class Resource:
    """One registered resource, as the engine would see it."""

    type: str
    name: str
    urn: str
    parent: str | None
    custom: bool
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    protect: bool = False
    depends_on: tuple[str, ...] = ()
    delete_before_replace: bool = False
    replace_on_changes: tuple[str, ...] = ()
    ignore_changes: tuple[str, ...] = ()
    retain_on_delete: bool = False
    secret_inputs: frozenset[str] = frozenset()
    """Top-level input names whose values are (or contain) secrets."""


@dataclass
class Run:
    """Everything a program or function registered and exported under the mocks."""

    resources: list[Resource] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    secret_outputs: frozenset[str] = frozenset()
    warnings: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)

    def of_type(self, suffix: str) -> list[Resource]:
        """Resources whose type ends with `suffix`, e.g. `Droplet` or `index/droplet:Droplet`."""
        return [r for r in self.resources if r.type.endswith(suffix)]

    def one(self, suffix: str) -> Resource:
        found = self.of_type(suffix)
        if len(found) != 1:
            raise AssertionError(f"expected one {suffix}, found {[r.name for r in found]}")
        return found[0]

    def by_urn(self, urn: str) -> Resource | None:
        return next((r for r in self.resources if r.urn == urn), None)


def _contains_secret(value: Any) -> bool:
    if isinstance(value, Mapping):
        return value.get(_SECRET_SIG) == _SECRET_VALUE or any(
            _contains_secret(v) for v in value.values())
    if isinstance(value, list):
        return any(_contains_secret(v) for v in value)
    return False


def _unwrap_secrets(value: Any) -> Any:
    """Inputs as the provider would receive them: secret envelopes opened at any depth."""
    if rpc.is_rpc_secret(value):
        return _unwrap_secrets(rpc.unwrap_rpc_secret(value))
    if isinstance(value, Mapping):
        return {k: _unwrap_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap_secrets(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # the wire carries every number as a double
    return value


class _Mocks(pulumi.runtime.Mocks):
    def __init__(self, database_ca: Path = DATABASE_CA):
        self.database_ca = database_ca

    def new_resource(self, args: pulumi_mocks.MockResourceArgs):
        outputs = mock_outputs(args.typ, args.name, args.inputs)
        resource_id = outputs.pop("id", None) or f"{args.name}-id"
        return resource_id, {**args.inputs, **outputs}

    def call(self, args: pulumi_mocks.MockCallArgs):
        return mock_call(args.token, args.args, database_ca=self.database_ca)


class _RecordingMonitor(pulumi_mocks.MockMonitor):
    def __init__(self, run: Run, database_ca: Path = DATABASE_CA):
        super().__init__(_Mocks(database_ca))
        self.run = run

    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        if request.type == "pulumi:pulumi:Stack":
            return response
        from google.protobuf import json_format

        raw = json_format.MessageToDict(request.object)
        state = self.resources[response.urn].state if response.urn in self.resources else {}
        self.run.resources.append(Resource(
            type=request.type,
            name=request.name,
            urn=response.urn,
            parent=request.parent or None,
            custom=request.custom,
            inputs=_unwrap_secrets(rpc.deserialize_properties(request.object)),
            outputs=dict(state),
            protect=request.protect,
            depends_on=tuple(request.dependencies),
            delete_before_replace=request.deleteBeforeReplace,
            replace_on_changes=tuple(request.replaceOnChanges),
            ignore_changes=tuple(request.ignoreChanges),
            retain_on_delete=request.retainOnDelete,
            secret_inputs=frozenset(k for k, v in raw.items() if _contains_secret(v)),
        ))
        return response


class _Logger:
    def __init__(self, run: Run):
        self.run = run

    def debug(self, msg, *a, **k):
        pass

    def info(self, msg, *a, **k):
        self.run.infos.append(str(msg))

    def warning(self, msg, *a, **k):
        self.run.warnings.append(str(msg))

    warn = warning

    def error(self, msg, *a, **k):
        self.run.warnings.append(f"error: {msg}")

    def exception(self, msg, *a, **k):
        self.error(msg)


def _run(body: Callable[[], Any], *, stack: str, config: Mapping[str, str],
         secret_keys: set[str] | frozenset[str] = frozenset(), run: Run | None = None,
         database_ca: Path = DATABASE_CA) -> Run:
    run = Run() if run is None else run
    pulumi.runtime.set_all_config(dict(config), list(secret_keys))
    pulumi.runtime.settings.ROOT.set(None)  # a fresh root stack: no outputs of a previous run
    monitor = _RecordingMonitor(run, database_ca)
    pulumi.runtime.set_mocks(monitor.mocks, project=PROJECT, stack=stack, preview=False,
                             monitor=monitor, logger=_Logger(run))
    _sync_await(pulumi.runtime.stack.run_pulumi_func(body))
    root = pulumi.runtime.get_root_resource()
    secret = set()
    for name, value in getattr(root, "outputs", {}).items():
        out = pulumi.Output.from_input(value)
        run.outputs[name] = _sync_await(out.future())
        if _sync_await(out.is_secret()):
            secret.add(name)
    run.secret_outputs = frozenset(secret)
    return run


def run_program(stack_file: Path, *, stack: str | None = None, run: Run | None = None,
                database_ca: Path = DATABASE_CA) -> Run:
    """Runs the real `__main__.py` with a stack's config file, as `pulumi preview` would.

    Pass `run` to keep what was registered even when the program raises, `database_ca` for the
    database CA certificate the account holds (the boot's, which its database presents).
    """
    stack = stack or stack_name(stack_file)
    config, secret = stack_config(stack_file)
    return _run(lambda: runpy.run_path(str(ROOT / "__main__.py"), run_name="__main__"),
                stack=stack, config=config, secret_keys=secret, run=run, database_ca=database_ca)


def run_function(fn: Callable[[], Any], *, stack: str = "test",
                 config: Mapping[str, str] | None = None, run: Run | None = None) -> Run:
    """Runs `fn` (which registers resources, e.g. one component) under the mocks; pass `run`
    to keep what was registered even when `fn` raises."""
    return _run(fn, stack=stack, config=config or {}, run=run)
