"""A psum inside a 7-step scan, compiled for 8 devices: the dry run's collective count."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from granite_jax.hlo import collective_traffic
from tests.multidevice import report


def main():
    mesh = jax.make_mesh((8,), ("fsdp",))

    def f(x):  # x sharded over fsdp; each step sums a (4, 256) float32 array over the devices
        def step(c, _):
            return c + jnp.sum(x * c[0, 0], axis=0, keepdims=True)[:, :256].repeat(4, 0), None

        return jax.lax.scan(step, jnp.ones((4, 256)), None, length=7)[0]

    x = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    traffic, unknown = collective_traffic(jax.jit(f).lower(x).compile().as_text())
    report([traffic, unknown])
