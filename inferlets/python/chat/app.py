"""Chat completion in Python: one user turn (and an optional system turn),
answered through the model's chat template with a sampler; sends the reply
text. The Python twin of `examples/chat`.

Arguments: `--prompt TEXT [--system TEXT] [--max-tokens N]
[--temperature T] [--seed S]`.
"""

import wit_world

import pie_inferlet as pie


def main() -> None:
    argv = pie.args()
    prompt = pie.arg_value(argv, "--prompt")
    if prompt is None:
        raise ValueError("missing --prompt TEXT")
    # A malformed number raises ValueError, which reaches the client.
    max_tokens = int(pie.arg_value(argv, "--max-tokens", "128"))
    sampler = pie.temperature(
        float(pie.arg_value(argv, "--temperature", "0")),
        seed=int(pie.arg_value(argv, "--seed", "0")),
    )
    ctx = pie.Context()
    system = pie.arg_value(argv, "--system")
    if system is not None:
        ctx.system(system)
    ctx.user(prompt)
    pie.send(ctx.generate_text(sampler, max_tokens))


class WitWorld(wit_world.WitWorld):
    def run(self) -> None:
        pie.run(main)
