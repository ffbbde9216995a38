"""The webstack policies, built from `rules.py`: importable without starting the analyzer.

`PolicyPack(...)` starts a gRPC server and blocks, so `__main__.py` only constructs it; tests
import `POLICIES` from here. Every policy is mandatory: a violation fails preview and up.
"""

from __future__ import annotations

import rules
from pulumi_policy import (
    EnforcementLevel,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

PACK_NAME = "webstack"


def _resource_policy(rule: rules.ResourceRule) -> ResourceValidationPolicy:
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        if args.resource_type != rule.resource_type:
            return
        for message in rule.check(args.props, stack=rules.stack_of(args.urn)):
            report_violation(message, None)

    return ResourceValidationPolicy(
        name=rule.name,
        description=rule.description,
        validate=validate,
        enforcement_level=EnforcementLevel.MANDATORY,
    )


def _validate_prod_redundancy(args: StackValidationArgs, report_violation: ReportViolation):
    stacks = {rules.stack_of(r.urn) for r in args.resources}
    for stack in stacks:
        resources = [
            rules.StackResource(r.resource_type, r.props, bool(r.opts.protect))
            for r in args.resources
            if rules.stack_of(r.urn) == stack
        ]
        for message in rules.prod_redundancy(stack, resources):
            report_violation(message, None)


POLICIES = [
    *(_resource_policy(rule) for rule in rules.RESOURCE_RULES),
    StackValidationPolicy(
        name="prod-redundancy",
        description=rules.PROD_REDUNDANCY_DESCRIPTION,
        validate=_validate_prod_redundancy,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
]
