"""LoRA tools on the command line, over the one format layer (`sdxl_pivotal.formats`):

    python -m sdxl_pivotal.tools convert  IN OUT [--to kohya|diffusers] [--base DIR]
    python -m sdxl_pivotal.tools merge    LORA --base DIR --output DIR|FILE.safetensors [--scale S] [--format F]
    python -m sdxl_pivotal.tools resize   IN OUT --rank N [--energy E] [--base DIR]
    python -m sdxl_pivotal.tools svd-merge A B ... --ratios 0.7 0.3 --rank N --output OUT [--conv_rank N]
    python -m sdxl_pivotal.tools extract  --base DIR --tuned DIR OUT --rank N [--conv]
    python -m sdxl_pivotal.tools inspect  FILE

One module per subcommand, each with `add_arguments(parser)`, `run(args)` and the function that does the work.
"""
