"""Analyses of trained dots models (`megatron-dots analyze`): expert specialization by domain
and the shared-expert ablation, forward only, under any TP / PP / EP layout.

`domains` reads and windows the evaluation text, `model_source` builds and loads the model,
`forward_pass` runs the windows and records routing and losses, `expert_share` and `ablation`
turn them into tables and verdicts, `figures` draws them, `cli` is the subcommand.
"""
