"""Click option types the commands share: number ranges that also refuse NaN and infinity (click's
FloatRange lets ``nan`` through, since every comparison with it is false), and whose error names
what was expected ("'abc' is not a valid integer", not click's "... a valid integer range")."""

from __future__ import annotations

import math

import click


class FiniteFloatRange(click.FloatRange):
    """A click.FloatRange whose values must also be finite."""

    name = "number"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        # click's own text for a range without bounds reads "x<=None" in --help
        if self.min is None and self.max is None:
            return "finite"
        return super()._describe_range()


class IntegerRange(click.IntRange):
    """A click.IntRange whose messages and --help say "integer" (click's say "integer range")."""

    name = "integer"


class BackendChoice(click.Choice):
    """--backend: one of runtime.backends.backend_choices(), an alias taken as the name it stands for
    (openvino:f32 is openvino:fp32: mrkd names precisions fp32/fp16/bf16/int8 everywhere)."""

    def __init__(self):
        from mrkd.runtime.backends import backend_choices
        super().__init__(backend_choices())

    def convert(self, value, param, ctx):
        from mrkd.runtime.backends import canonical_backend_spec
        return super().convert(canonical_backend_spec(value), param, ctx)


def seconds(minimum: float = 0.0, open_min: bool = False, maximum: float | None = None) -> FiniteFloatRange:
    """A finite number of seconds >= ``minimum`` (> with ``open_min``)."""
    return FiniteFloatRange(min=minimum, max=maximum, min_open=open_min)


FINITE = FiniteFloatRange()
POSITIVE = FiniteFloatRange(min=0.0, min_open=True)
FRACTION = FiniteFloatRange(0.0, 1.0, min_open=True, max_open=True)
