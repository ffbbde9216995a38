"""The local HA lab: a stack's data plane on loopback, and chaos scenarios against it.

- `lab.stack`: start and stop the lab (droplets, PostgreSQL, frontend) from the same
  rendered files as the droplets (`make lab`, `make lab-down`);
- `lab.load`: a bounded load generator counting every request by outcome;
- `lab.chaos`: the scenarios, their criteria and the report (`make chaos`).

Command line: `python -m lab up STACK`, `python -m lab down`, `python -m lab chaos STACK`.
"""
