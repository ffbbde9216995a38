"""An architecture picture of a stack, drawn from the resources the program registered.

    from tools.diagram import draw
    draw(run, Path("docs/prod.png"), title="webstack prod")   # run: a tools.mocks.Run

The entry (a managed load balancer, or a reserved IP on nginx load-balancer droplets), the app
droplets, the database primary with one node per standby, its pool and read replicas (and the
optional Prometheus droplet) sit inside the VPC boundary; DNS and the users outside it; alert
policies and uptime checks in their own box. Built with the `graphviz` package; rendering needs
Graphviz's `dot` (Debian `graphviz`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import graphviz

FRONTEND = "webstack:index:LoadBalancedFrontend$"
"""Droplets registered under the frontend component are nginx load balancers, not app servers."""
PROMETHEUS = "webstack:index:PrometheusServer$"
"""Nor is the Prometheus droplet (`monitoring.prometheus`)."""
COLORS = {"entry": "#cfe2f3", "app": "#d9ead3", "db": "#fff2cc", "watch": "#eeeeee"}


def _of(run: Any, kind: str) -> list[Any]:
    """The DigitalOcean resources of one kind (Droplet, LoadBalancer...), by name."""
    return sorted((r for r in run.of_type(f":{kind}") if r.type.startswith("digitalocean:")),
                  key=lambda r: r.name)


def _node(g: graphviz.Digraph, r: Any, title: str, detail: str = "", role: str = "app") -> None:
    label = "\n".join(part for part in (title, r.name, detail) if part)
    g.node(r.name, label, fillcolor=COLORS[role])


def graph(run: Any, title: str) -> graphviz.Digraph:
    """The stack's architecture as a Graphviz graph (its `.source` is the DOT text)."""
    g = graphviz.Digraph("webstack", graph_attr={
        "label": title, "labelloc": "t", "fontsize": "18", "rankdir": "LR", "compound": "true",
        "fontname": "Helvetica"})
    g.attr("node", shape="box", style="rounded,filled", fontname="Helvetica", fontsize="11")
    g.attr("edge", fontname="Helvetica", fontsize="9")
    droplets = _of(run, "Droplet")
    lb_droplets = [d for d in droplets if FRONTEND in d.urn]
    scrapers = [d for d in droplets if PROMETHEUS in d.urn]
    pools = _of(run, "DropletAutoscale")
    apps = [d for d in droplets if d not in lb_droplets and d not in scrapers]

    g.node("users", "users", shape="oval", style="filled", fillcolor="white")
    entries = [lb.name for lb in _of(run, "LoadBalancer")]
    entries += [ip.name for ip in _of(run, "ReservedIp")]
    for record in _of(run, "DnsRecord"):
        g.node(record.name, f"DNS\n{record.inputs.get('name')}.{record.inputs.get('domain')}",
               shape="note", style="filled", fillcolor="white")
        g.edge("users", record.name)
        for entry in entries:
            g.edge(record.name, entry, style="dashed", label="A record")

    vpcs = _of(run, "Vpc")
    region = vpcs[0].inputs.get("region", "") if vpcs else ""
    with g.subgraph(name="cluster_vpc") as vpc:
        vpc.attr(label=f"VPC {' '.join(v.name for v in vpcs)} ({region})", style="dashed")
        for lb in _of(run, "LoadBalancer"):
            _node(vpc, lb, "Load balancer", f"{int(lb.inputs.get('sizeUnit', 1))} node(s)",
                  "entry")
        for i, d in enumerate(lb_droplets):
            _node(vpc, d, "nginx LB droplet", f"{d.inputs.get('size')}"
                  f"{'' if i == 0 else ', warm spare'}", "entry")
        with vpc.subgraph(name="cluster_app") as tier:
            tier.attr(label="app tier", style="rounded")
            for d in apps:
                _node(tier, d, "app droplet", str(d.inputs.get("size")), "app")
            for pool in pools:
                config, template = pool.inputs["config"], pool.inputs["dropletTemplate"]
                _node(tier, pool, "autoscale pool", f"{config['minInstances']} to"
                      f" {config['maxInstances']} x {template['size']}", "app")
        _database(vpc, run, apps + pools)
        for d in scrapers:
            _node(vpc, d, "Prometheus + Alertmanager", f"{d.inputs.get('size')}", "watch")
            if apps or pools:
                vpc.edge(d.name, (apps + pools)[0].name, label="scrapes /metrics", style="dotted",
                         lhead="cluster_app")
    for ip in _of(run, "ReservedIp"):
        _node(g, ip, "Reserved IP", "", "entry")
        for i, d in enumerate(lb_droplets):
            g.edge(ip.name, d.name, label="assigned" if i == 0 else "fail-over",
                   style="solid" if i == 0 else "dashed")

    for entry in entries:
        g.edge("users", entry, label="HTTP(S)")
    for source in [lb.name for lb in _of(run, "LoadBalancer")] + [d.name for d in lb_droplets]:
        for app in apps + pools:
            g.edge(source, app.name)
    _watchers(g, run, entries)
    return g


def _database(vpc: graphviz.Digraph, run: Any, apps: list[Any]) -> None:
    """The managed database: primary, one node per standby, pool, replicas."""
    with vpc.subgraph(name="cluster_db") as db:
        db.attr(label="managed PostgreSQL", style="rounded")
        for cluster in _of(run, "DatabaseCluster"):
            size = cluster.inputs.get("size")
            _node(db, cluster, "DB primary", f"{size}", "db")
            for i in range(1, int(cluster.inputs.get("nodeCount", 1))):
                standby = f"{cluster.name}-standby-{i}"
                db.node(standby, f"DB standby {i}\n{cluster.name}\n{size}",
                        fillcolor=COLORS["db"])
                db.edge(cluster.name, standby, label="fail-over", style="dashed")
            for pool in _of(run, "DatabaseConnectionPool"):
                _node(db, pool, "PgBouncer pool",
                      f"{pool.inputs.get('mode')}, size {int(pool.inputs.get('size', 0))}", "db")
                db.edge(pool.name, cluster.name)
            for replica in _of(run, "DatabaseReplica"):
                _node(db, replica, "DB read replica", str(replica.inputs.get("size")), "db")
                db.edge(cluster.name, replica.name, label="async", style="dashed")
    if apps:
        tail = {"ltail": "cluster_app"}
        pools = _of(run, "DatabaseConnectionPool") or _of(run, "DatabaseCluster")
        for target in pools:
            vpc.edge(apps[0].name, target.name, label="writes", **tail)
        for replica in _of(run, "DatabaseReplica"):
            vpc.edge(apps[0].name, replica.name, label="reads", style="dashed", **tail)


def _watchers(g: graphviz.Digraph, run: Any, entries: list[str]) -> None:
    """Alert policies and uptime checks, in a box of their own."""
    alerts = _of(run, "MonitorAlert") + _of(run, "UptimeAlert")
    checks = _of(run, "UptimeCheck")
    if not alerts and not checks:
        return
    with g.subgraph(name="cluster_watch") as watch:
        watch.attr(label="monitoring", style="rounded")
        for check in checks:
            _node(watch, check, "Uptime check", "", "watch")
            for entry in entries:  # in the outer graph, or the entry would join the box
                g.edge(check.name, entry, style="dotted", label="probes")
        if alerts:
            names = "\n".join(a.name for a in alerts)
            watch.node("alerts", f"{len(alerts)} alert policies\n{names}",
                       fillcolor=COLORS["watch"])


def draw(run: Any, path: Path, title: str) -> Path:
    """Render the stack's architecture to a PNG at `path`; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(graph(run, title).pipe(format="png"))
    return path
