"""Sharding on 8 CPU devices: run by tests/toolshed/test_sharding_devices.py in a subprocess.

Needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu``
(set before jax is imported, hence the subprocess). Prints one ``OK`` line per
check and ``ALL OK`` at the end; any failure is an exception (non-zero exit).
"""

from __future__ import annotations

import time

import jax

START = time.perf_counter()
assert jax.device_count() == 8, f"needs 8 devices, found {jax.device_count()}; set XLA_FLAGS"

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import pzbridge as pzb  # noqa: E402
from pzbridge.bridge.sharding import lower_sharded  # noqa: E402
from pzbridge.models.gpt import build_gpt  # noqa: E402
from pzbridge.toolshed.lora import is_lora_parameter, loraify_linears_in_selection  # noqa: E402
from pzbridge.toolshed.sharding import (  # noqa: E402
    ShardingRules,
    constrain_sharding,
    shard_inputs,
    shard_model,
    sharding_specs,
)
from pzbridge.toolshed.training import build_train_step, trainable_values  # noqa: E402

MESH = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
RULES = ShardingRules({"heads": "model", "neurons": "model", "batch": "data"})
ATOL = 1e-5  # sharded matmuls reduce in another order: a few ulp, never bitwise.


def params(model):
    return pzb.select(model).at_instances_of(pzb.Parameter).get_sequence()


def expected_spec(named) -> tuple:
    """The spec the rules give, written independently of the code under test: rule of each stored name."""
    rules = dict(RULES.rules)
    return (None,) * len(named.positional_shape) + tuple(rules.get(n) for n in named.named_axes)


def full(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def check_placed_by_names(model, what: str) -> int:
    checked = 0
    for p in params(model):
        array = p.value.data_array
        assert isinstance(array.sharding, NamedSharding), (what, p.label, array.sharding)
        assert full(array.sharding.spec, array.ndim) == expected_spec(p.value), (what, p.label, array.sharding.spec)
        checked += 1
    return checked


def unsharded(model) -> bool:
    return all(len(p.value.data_array.sharding.device_set) == 1 for p in params(model))


def close(a, b, names) -> None:
    a, b = np.asarray(a.unwrap(*names)), np.asarray(b.unwrap(*names))
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


# -- the pzb.nn GPT ---------------------------------------------------------------------------

gpt = build_gpt("gpt", jax.random.key(0), vocab_size=64, num_layers=1, num_heads=4, d_model=32, d_mlp=64)
tokens = pzb.nx.wrap(jax.random.randint(jax.random.key(1), (4, 8), 0, 64), "batch", "seq")
logits_names = ("batch", "seq", "vocabulary")
reference = gpt(tokens)

sharded = shard_model(gpt, MESH, RULES)
assert unsharded(gpt), "shard_model changed the input model"
n = check_placed_by_names(sharded, "gpt")
query = sharded.sublayers[1].sublayers[0].delta.sublayers[1]
specs = sharding_specs(sharded, RULES)
assert specs["gpt.blocks.0.attn.query.weights"] == P(None, "model", None)
assert specs["gpt.blocks.0.attn.output.weights"] == P("model", None, None)
assert specs["gpt.blocks.0.mlp.in.weights"] == P(None, "model")
assert specs["gpt.embed.embeddings"] == P(None, None)
total = sum(p.value.data_array.nbytes for p in params(sharded))
on_device_0 = sum(shard.data.nbytes for p in params(sharded) for shard in p.value.data_array.addressable_shards
                  if shard.device == jax.devices()[0])
assert on_device_0 < total
print(f"OK gpt: {n} parameters placed by names (heads->model, neurons->model), "
      f"device 0 holds {on_device_0 / total:.2f} of the parameter bytes [{time.perf_counter() - START:.0f} s]")

run = jax.jit(lambda model, x: model(x))
placed_tokens = shard_inputs(tokens, MESH, RULES)
assert full(placed_tokens.data_array.sharding.spec, 2) == ("data", None)
out = run(pzb.freeze_params(sharded), placed_tokens)
close(out, reference, logits_names)
assert out.data_array.sharding.spec[0] == "data", out.data_array.sharding
print(f"OK gpt: sharded jit output equals unsharded (atol 1e-5), batch->data on the logits [{time.perf_counter() - START:.0f} s]")

constrained = constrain_sharding(sharded, pzb.nn.Residual, {"batch": "data", "heads": "model"}, MESH)
jaxpr = str(jax.make_jaxpr(lambda m, x: m(x))(pzb.freeze_params(constrained), placed_tokens))
assert jaxpr.count("sharding_constraint") == 2, jaxpr.count("sharding_constraint")
close(run(pzb.freeze_params(constrained), placed_tokens), reference, logits_names)
print(f"OK gpt: 2 ConstrainSharding layers after the residuals, output unchanged [{time.perf_counter() - START:.0f} s]")

# -- a LoRA training step, sharded ------------------------------------------------------------

adapted = loraify_linears_in_selection(pzb.select(gpt).at_instances_of(pzb.nn.Linear), 2, jax.random.key(2))
adapted = shard_model(adapted, MESH, RULES)
check_placed_by_names(adapted, "lora")
lora_b = [p for p in params(adapted) if p.label == "gpt.blocks.0.attn.query.lora_b"][0]
assert full(lora_b.value.data_array.sharding.spec, 3) == (None, "model", None)
targets = jnp.roll(tokens.unwrap("batch", "seq"), -1, axis=1)


def loss_fn(model, x, y):
    logits = model(x).unwrap("batch", "seq", "vocabulary")
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


optimizer = optax.adam(1e-2)
opt_state = optimizer.init(trainable_values(adapted, is_lora_parameter))
step = build_train_step(loss_fn, optimizer, trainable=is_lora_parameter)
before = np.asarray(lora_b.value.data_array)
loss, _, opt_state = step(adapted, opt_state, placed_tokens, shard_inputs(targets, MESH, RULES))
loss2, _, opt_state = step(adapted, opt_state, placed_tokens, shard_inputs(targets, MESH, RULES))
assert np.isfinite(float(loss)) and float(loss2) < float(loss), (float(loss), float(loss2))
assert not np.array_equal(before, np.asarray(lora_b.value.data_array)), "LoRA B did not train"
check_placed_by_names(adapted, "lora after steps")
print(f"OK lora: jit training steps sharded, loss {float(loss):.4f} -> {float(loss2):.4f}, params still placed [{time.perf_counter() - START:.0f} s]")

# -- lowering the GPT -------------------------------------------------------------------------

eqx_gpt = lower_sharded(sharded, framework="equinox")
arrays = {id(p.value.data_array): p.value.data_array for p in params(sharded)}
leaves = [leaf for leaf in jax.tree.leaves(eqx_gpt) if isinstance(leaf, jax.Array)]
assert {id(leaf) for leaf in leaves} == set(arrays), "the lowered Equinox module does not hold the placed buffers"
nnx_gpt = lower_sharded(sharded, framework="nnx")
annotated = 0
for _, var in nnx.iter_graph(nnx_gpt):
    if isinstance(var, nnx.Param):
        raw = var.get_raw_value()
        assert full(raw.sharding.spec, raw.ndim) == var.get_metadata()["out_sharding"], var
        annotated += "model" in var.get_metadata()["out_sharding"]
assert annotated == 7, annotated  # query, key, value, output weights; mlp.in weights and bias, mlp.out weights.
print(f"OK gpt lowered: Equinox holds the placed buffers; NNX out_sharding matches placement ({annotated} sharded) [{time.perf_counter() - START:.0f} s]")

# -- a traced custom Equinox model ------------------------------------------------------------


class EqxAttention(eqx.Module):
    W_Q: jax.Array
    W_K: jax.Array
    W_V: jax.Array
    W_O: jax.Array

    def __call__(self, x):
        q, k, v = (jnp.einsum("sd,hdk->hsk", x, w) for w in (self.W_Q, self.W_K, self.W_V))
        scores = jnp.einsum("hqk,hsk->hqs", q, k) / jnp.sqrt(q.shape[-1])
        return jnp.einsum("hqs,hsk,hkd->qd", jax.nn.softmax(scores, axis=-1), v, self.W_O)


class EqxBlock(eqx.Module):
    attn: EqxAttention
    mlp: eqx.nn.MLP

    def __call__(self, x):
        x = x + self.attn(x)
        return x + jax.vmap(self.mlp)(x)


keys = jax.random.split(jax.random.key(3), 5)
block = EqxBlock(EqxAttention(*(0.3 * jax.random.normal(k, s) for k, s in
                                zip(keys[:4], [(4, 16, 4)] * 3 + [(4, 4, 16)]))),
                 eqx.nn.MLP(16, 16, 32, 1, key=keys[4]))
x = jax.random.normal(jax.random.key(4), (4, 8, 16))
lifted = pzb.lift(block, x[0], strict=True)
placed = shard_model(lifted, MESH, RULES)
check_placed_by_names(placed, "eqx traced")
named_x = shard_inputs(pzb.nx.wrap(x, "batch", "seq", "features"), MESH, RULES)
got = run(pzb.freeze_params(placed), named_x)
np.testing.assert_allclose(np.asarray(got.unwrap("batch", "seq", "features")), np.asarray(jax.vmap(block)(x)),
                           atol=ATOL, rtol=0)
lowered = lower_sharded(placed)
assert type(lowered) is EqxBlock and lowered.attn.W_Q.sharding.spec == P("model", None, None)
assert len(block.attn.W_Q.sharding.device_set) == 1, "the user's module was changed"
np.testing.assert_allclose(np.asarray(eqx.filter_jit(lambda m, v: jax.vmap(m)(v))(lowered, x)), np.asarray(jax.vmap(block)(x)),
                           atol=ATOL, rtol=0)
print(f"OK eqx traced: sharded output equals the module's; lowered EqxBlock holds heads->model arrays [{time.perf_counter() - START:.0f} s]")

# -- a traced custom NNX model ----------------------------------------------------------------


class NnxAttention(nnx.Module):
    def __init__(self, d, h, k, rngs):
        init = nnx.initializers.normal(0.3)
        self.W_Q, self.W_K, self.W_V = (nnx.Param(init(rngs.params(), (h, d, k))) for _ in range(3))
        self.W_O = nnx.Param(init(rngs.params(), (h, k, d)))

    def __call__(self, x):
        q, k, v = (jnp.einsum("bsd,hdk->bhsk", x, w) for w in (self.W_Q, self.W_K, self.W_V))
        scores = jnp.einsum("bhqk,bhsk->bhqs", q, k) / jnp.sqrt(q.shape[-1])
        return jnp.einsum("bhqs,bhsk,hkd->bqd", jax.nn.softmax(scores, axis=-1), v, self.W_O)


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = NnxAttention(16, 4, 4, rngs)
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.down(jax.nn.gelu(self.up(x)))


nblock = NnxBlock(nnx.Rngs(5))
nlifted = pzb.lift(nblock, x, strict=True)
rules = ShardingRules({**RULES.as_dict(), "features_out": "model"})
nplaced = shard_model(nlifted, MESH, rules)
got = run(pzb.freeze_params(nplaced), named_x)
np.testing.assert_allclose(np.asarray(got.unwrap("batch", "seq", "features")), np.asarray(nblock(x)),
                           atol=ATOL, rtol=0)
nlowered = lower_sharded(nplaced)
assert type(nlowered) is NnxBlock
pspecs = nnx.get_partition_spec(nnx.state(nlowered))
named = nnx.get_named_sharding(nnx.state(nlowered), MESH)
assert pspecs["attn"]["W_Q"].get_value() == P("model", None, None)
assert pspecs["up"]["kernel"].get_value() == P(None, "model")
assert named["up"]["kernel"].get_value().is_equivalent_to(nlowered.up.kernel.get_raw_value().sharding, 2)
assert "out_sharding" not in nblock.up.kernel.get_metadata(), "the user's Variables were changed"
np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, v: m(v))(nlowered, x)), np.asarray(nblock(x)),
                           atol=ATOL, rtol=0)

# NNX's own training follows the metadata: the optimizer state is created placed like the parameters.
nnx_optimizer = nnx.Optimizer(nlowered, optax.adam(1e-2), wrt=nnx.Param)
assert nnx_optimizer.opt_state[0].mu["attn"]["W_Q"].get_raw_value().sharding.spec == P("model", None, None)


@nnx.jit
def nnx_step(model, opt, v):
    loss, grads = nnx.value_and_grad(lambda m: (m(v) ** 2).mean())(model)
    opt.update(model, grads)
    return loss


assert np.isfinite(float(nnx_step(nlowered, nnx_optimizer, x)))
assert nlowered.attn.W_Q.get_raw_value().sharding.spec == P("model", None, None)
print(f"OK nnx traced: sharded output equals the module's; lowered NnxBlock partition specs match placement, "
      f"nnx.Optimizer step keeps it [{time.perf_counter() - START:.0f} s]")

print(f"ALL OK in {time.perf_counter() - START:.1f} s")
