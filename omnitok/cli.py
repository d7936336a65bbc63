"""The ``omnitok`` command: one thin function per subcommand, each parsing its arguments and calling one library
function. Library imports happen inside the functions so that ``omnitok --help`` starts fast.

Wrong usage and bad input (``OmnitokError``) print one line and exit with status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from omnitok.errors import OmnitokError, Stopped


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at ``--help``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_text_tokenizer_train(args: argparse.Namespace) -> None:
    from omnitok.train.text_tokenizer import TextTokenizerTrainConfig, format_report, train_text_tokenizer

    config = TextTokenizerTrainConfig(vocab_size=args.vocab_size, character_coverage=args.character_coverage,
                                      max_sentences=args.max_sentences)
    _, report = train_text_tokenizer(args.input, args.out, config)
    print(format_report(report, args.out))


def cmd_tokenizer_assemble(args: argparse.Namespace) -> None:
    from omnitok.tokenizers.multimodal import assemble

    tok = assemble(args.text, args.out, image=args.image, audio=args.audio, text_vocab_size=args.text_vocab_size,
                   bos_token=args.bos_token, eos_token=args.eos_token, chat=args.chat)
    print(f"tokenizer written to {args.out}\n{tok.layout.describe()}")
    if tok.chat is not None:
        print("chat: " + ("the role markers" if tok.chat.kind == "markers" else
                          f"the text tokenizer's own template, a turn ends with {tok.text.decode([tok.chat.end_id])}"))


def cmd_tokenizer_info(args: argparse.Namespace) -> None:
    from omnitok.tokenizers.layout import TokenLayout

    print(TokenLayout.load(args.dir).describe())


def cmd_image_tokenizer_import(args: argparse.Namespace) -> None:
    from omnitok.tokenizers.image_import import import_image_tokenizer

    tok = import_image_tokenizer(args.format, args.src, args.out, image_size=args.image_size, resize=args.resize)
    cfg = tok.config
    print(f"image tokenizer written to {args.out}: {cfg.codebook_size} codes x {cfg.codebook_dim} dims "
          f"({'l2-normalised' if cfg.l2_normalized_codes else 'Euclidean'} lookup), downsampling {cfg.downsample}, "
          f"{tok.preprocess_config.image_size}px -> grids up to {tok.max_grid_side}x{tok.max_grid_side}"
          + ("" if cfg.has_decoder else "; encoder only (no decoder in this checkpoint)"))


def cmd_image_tokenizer_train(args: argparse.Namespace) -> None:
    from omnitok.train.vqgan import load_train_config, train_vqgan

    cfg = load_train_config(args.config, args.overrides)
    metrics = train_vqgan(args.images, args.out, cfg, resume=args.resume, device=args.device)
    print(f"image tokenizer written to {args.out}; held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, "
          f"codebook usage {metrics['codebook_usage']:.1%}, perplexity {metrics['perplexity']:.1f}; samples in "
          f"{args.out}/samples, TensorBoard logs in {args.out}/tb")


def cmd_audio_tokenizer_import(args: argparse.Namespace) -> None:
    from omnitok.tokenizers.audio_import import import_audio_tokenizer

    tok = import_audio_tokenizer(args.format, args.src, args.out, bandwidth=args.bandwidth, preset=args.preset,
                                 num_codebooks=args.codebooks)
    sizes = tok.codebook_sizes
    books = f"{len(sizes)} codebook(s) of {sizes[0]}" if len(set(sizes)) == 1 else f"codebooks of {list(sizes)}"
    kbps = f" at {tok.config.bandwidth:g} kbps" if tok.config.bandwidth is not None else ""
    print(f"audio tokenizer ({tok.kind}) written to {args.out}: {tok.sample_rate} Hz, {tok.channels} channel(s), "
          f"{tok.frame_rate:g} frames/s, {books}{kbps}: {tok.frame_rate * len(sizes):g} tokens per second")


def cmd_audio_tokenizer_train(args: argparse.Namespace) -> None:
    from omnitok.train.codec import load_codec_config, train_codec

    cfg = load_codec_config(args.config, [f"model.preset={args.preset}", *args.overrides])
    metrics = train_codec(args.audio, args.out, cfg, resume=args.resume, device=args.device)
    print(f"audio tokenizer written to {args.out}; held-out SI-SDR {metrics['si_sdr']:.2f} dB, mel distance "
          f"{metrics['mel_distance']:.3f}, STOI {metrics['stoi']:.3f}; WAV samples in {args.out}/samples, "
          f"TensorBoard logs in {args.out}/tb")


def cmd_tokenize(args: argparse.Namespace) -> None:
    from omnitok.data.tokenize import TokenizeConfig, command_line, summary, tokenize

    cfg = TokenizeConfig(inputs=args.input, tokenizer=str(args.tokenizer), out=str(args.out), workers=args.workers,
                         batch_size=args.batch_size, shard_size=args.shard_size, pair_order=args.pair_order,
                         seed=args.seed, num_parts=args.num_parts, part=args.part, loss_on=args.loss_on,
                         engine=args.engine, ray_address=args.ray_address, encoders=args.encoders,
                         gpus_per_encoder=args.gpus_per_encoder)
    print(summary(tokenize(cfg, command_line()), str(args.out)))


def cmd_shards_stats(args: argparse.Namespace) -> None:
    from omnitok.data.shards import shard_stats

    report, problems = shard_stats(args.dir, plot=args.dir / "token_lengths.png" if not args.no_plot else None)
    print(report)
    if problems:  # a check that scripts can rely on
        raise OmnitokError(f"{' and '.join(problems)} in {args.dir} (above)")


def cmd_shards_merge(args: argparse.Namespace) -> None:
    from omnitok.data.shards import merge_shards

    manifest = merge_shards(args.out, args.parts)
    print(f"merged {len(args.parts)} parts into {args.out}: {manifest['samples']} samples in "
          f"{len(manifest['shards'])} shards, {manifest['error_count']} errors")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from omnitok.distributed import is_main_process
    from omnitok.train.pretrain import load_pretrain_config, pretrain

    cfg = load_pretrain_config(args.config, args.overrides)
    stats = pretrain(cfg, resume=args.resume)
    if is_main_process():
        print(f"pretraining done: loss {stats.get('loss', float('nan')):.4f}; run in {cfg.out}, Hugging Face export "
              f"in {cfg.out}/export")


def cmd_finetune(args: argparse.Namespace) -> None:
    from omnitok.distributed import is_main_process
    from omnitok.train.finetune import finetune, load_finetune_config

    cfg = load_finetune_config(args.config, args.overrides)
    stats = finetune(cfg, resume=args.resume)
    if is_main_process():
        print(f"fine-tuning done ({cfg.method}): loss {stats.get('loss', float('nan')):.4f}; run in {cfg.out}, "
              f"Hugging Face export in {cfg.out}/export" + (" (adapter in export/adapter)"
                                                            if (Path(cfg.out) / "export" / "adapter").is_dir() else ""))


def cmd_export(args: argparse.Namespace) -> None:
    from omnitok.train.export import export_run

    what = "PEFT adapter" if args.adapter else "Hugging Face model"
    print(f"exported {export_run(args.run, args.out, adapter=args.adapter)} ({what}; tokenizer in "
          f"{args.out}/tokenizer)")


def _model_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--model", required=True, type=Path, help=what)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: MODEL/tokenizer)")


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling flags and KEY=VALUE settings `sample` and `chat` share (read back by `_sampling`)."""
    parser.add_argument("--output-modality", default="any", choices=["any", "text", "image", "audio"],
                        help="image / audio: the output is one span of that kind; text: text only, never empty")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--grid", help="fixed image grid ROWSxCOLS (default: the model chooses)")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding")
    parser.add_argument("--compile", action="store_true", help="run the decoder's layers under torch.compile "
                        "(same tokens; the first steps wait for the compiler, about a minute on a CPU)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="sampling settings, e.g. image.top_k=500 "
                        "image.guidance=3 text.temperature=0.7")


def _sampling(args: argparse.Namespace):
    from omnitok.model.sample import sampling_config

    grid = None
    if args.grid:
        rows, x, cols = args.grid.lower().partition("x")
        if not x or not rows.isdigit() or not cols.isdigit():
            raise OmnitokError(f"--grid must look like 16x16, got {args.grid!r}")
        grid = [int(rows), int(cols)]
    return sampling_config(args.overrides, output=args.output_modality, max_new_tokens=args.max_new_tokens,
                           grid=grid, greedy=args.greedy or None)


def cmd_sample(args: argparse.Namespace) -> None:
    from omnitok.model.sample import (
        SampleRequest,
        check_media,
        load_model,
        parse_chat_prompt,
        parse_prompt,
        read_prompt_file,
        sample,
    )

    if not args.prompt and not args.prompts:
        raise OmnitokError("give --prompt TEXT (repeatable) or --prompts FILE")
    request = SampleRequest(_sampling(args), args.num_samples, args.seed, args.batch_size, chat=args.chat,
                            compiled=args.compile)
    parse = parse_chat_prompt if args.chat else parse_prompt
    prompts = [parse(p) for p in args.prompt] + (read_prompt_file(args.prompts, args.chat) if args.prompts else [])
    for p in prompts:
        check_media(p)
    model, tok = load_model(args.model, args.tokenizer)
    records = sample(model, tok, prompts, args.out, request)
    kinds = [s["type"] for r in records for s in r["segments"]]
    print(f"{len(records)} samples in {args.out}: {kinds.count('text')} text, {kinds.count('image')} image and "
          f"{kinds.count('audio')} audio segments; open {Path(args.out) / 'index.html'}")


def cmd_chat(args: argparse.Namespace) -> None:
    from omnitok.model.chat import ChatSession, chat_loop
    from omnitok.model.sample import load_model

    sampling = _sampling(args)
    model, tok = load_model(args.model, args.tokenizer)
    session = ChatSession(model, tok, args.out, sampling, seed=args.seed, compiled=args.compile)

    def lines():
        while True:
            try:
                yield input("you> ")
            except EOFError:
                return

    chat_loop(session, lines(), print)


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    import uvicorn

    from omnitok.model.sample import load_model
    from omnitok.serve.app import ServeConfig, ServeLimits, bind, create_app

    key = args.api_key or os.environ.get("OMNITOK_API_KEY") or None
    limits = ServeLimits(max_tokens=args.max_tokens, max_n=args.max_n, request_timeout=args.request_timeout)
    cfg = ServeConfig(name=args.model.resolve().name, api_key=key, max_rows=args.max_rows, max_queue=args.max_queue,
                      compiled=args.compile, limits=limits, sampling=_sampling(args))
    sock = bind(args.host, args.port)
    model, tok = load_model(args.model, args.tokenizer)
    if args.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"warning: serving on {args.host} without an API key: anyone who reaches it can use the model",
              file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.model} on http://{host}:{sock.getsockname()[1]}/ (chat page at /, API at /v1)", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(model, tok, cfg), log_level="warning")).run(sockets=[sock])


def cmd_eval_tokenizer(args: argparse.Namespace) -> None:
    from omnitok.eval.evaluate import eval_audio_tokenizer, eval_image_tokenizer

    if (args.image_tokenizer is None) != (args.images is None) or (args.audio_tokenizer is None) != (args.audio is
                                                                                                     None):
        raise OmnitokError("give --image-tokenizer with --images, and --audio-tokenizer with --audio")
    if args.image_tokenizer is None and args.audio_tokenizer is None:
        raise OmnitokError("give --image-tokenizer DIR --images DIR and/or --audio-tokenizer DIR --audio DIR")
    if args.image_tokenizer is not None:
        r = eval_image_tokenizer(args.image_tokenizer, args.images, args.out, args.limit, args.fid_features)
        fid = f", FID {r['fid']:.2f}" if "fid" in r else ""
        print(f"images: {r['images']} at {r['size'][0]}x{r['size'][1]}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}"
              f"{fid}, codebook usage {r['codebook']['usage']:.1%}, perplexity {r['codebook']['perplexity']:.1f}"
              + (f"; skipped: {', '.join(r['skipped'])}" if r.get("skipped") else ""))
    if args.audio_tokenizer is not None:
        r = eval_audio_tokenizer(args.audio_tokenizer, args.audio, args.out, args.limit)
        usage = ", ".join(f"{c['usage']:.0%}" for c in r["codebooks"])
        left_out = ", ".join(f"{len(r[k])} {k.replace('_', ' ')}" for k in ("unreadable", "too_short") if r[k])
        print(f"audio: {r['clips']} clips, {r['seconds']:.1f} s: SI-SDR {r['si_sdr']:.2f} dB, mel distance "
              f"{r['mel_distance']:.3f}, STOI {r['stoi']:.3f}, codebook usage {usage}; WAV pairs in {args.out}/samples"
              + (f"; skipped: {left_out} (audio_report.json)" if left_out else ""))
    print(f"reports and plots in {args.out}")


def cmd_eval_lm(args: argparse.Namespace) -> None:
    from omnitok.eval.evaluate import eval_lm

    r = eval_lm(args.model, args.shards, args.out, max_docs=args.max_docs, seq_len=args.seq_len)
    parts = [f"{name} {m['loss']:.3f} (ppl {m['perplexity']:.1f}, {m['tokens']} tokens)"
             for name, m in r["modalities"].items()]
    print(f"{r['documents']} documents: loss {r['all']['loss']:.3f}; " + "; ".join(parts))


def cmd_eval_samples(args: argparse.Namespace) -> None:
    from omnitok.eval.evaluate import eval_samples

    r = eval_samples(args.dir, clip=args.clip, clap=args.clap)
    valid = ", ".join(f"{k} {v:.0%}" for k, v in r["valid"].items() if v is not None)
    print(f"{r['samples']} samples, {r['new_tokens']} new tokens; segments: "
          + ", ".join(f"{n} {k}" for k, n in r["segments"].items()) + (f"; valid: {valid}" if valid else "")
          + (f"; {len(r['problems'])} problems (see eval_samples.json)" if r["problems"] else ""))
    for flag, what in (("clip", "images"), ("clap", "sounds")):
        name = f"{flag}_score"
        if name in r:
            print(f"{flag.upper()} score {r[name]['score']:.2f} (mean cosine {r[name]['cosine']:.4f}) over "
                  f"{r[name]['pairs']} {what} and their prompts")
        elif getattr(args, flag) is not None:
            print(f"{flag.upper()} score skipped: {r['skipped'][name]}")


def cmd_demo(args: argparse.Namespace) -> None:
    from omnitok.demo.run import run_demo

    run_demo(main, args.out, steps=args.steps, seed=args.seed, sft_steps=args.sft_steps)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="omnitok", description="Text, images and audio in one token space: build tokenizers, "
                     "tokenize corpora to WebDataset shards, pretrain one decoder LM, sample interleaved output.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser, required=True)

    demo = commands.add_parser("demo", help="the whole pipeline on a small generated corpus, in minutes on a CPU",
                               description="Make a corpus of captioned shapes and sounds, build tokenizers, tokenize "
                               "to shards, pretrain a tiny LM with DeepSpeed, sample images, audio and text, "
                               "instruction-tune it and measure it on held-out requests against the "
                               "pretrained model, and write a gallery (index.html) and a summary.")
    demo.add_argument("--out", type=Path, default=Path("omnitok-demo"), help="new directory (default ./omnitok-demo)")
    demo.add_argument("--steps", type=int, default=250, help="pretraining steps (default 250)")
    demo.add_argument("--sft-steps", type=int, default=120, help="instruction-tuning steps (default 120)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    text = commands.add_parser("text-tokenizer", help="train a text tokenizer")
    text_cmds = text.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser, required=True)
    train = text_cmds.add_parser("train", help="train SentencePiece BPE with byte fallback on text or JSONL files",
                                 description="Train SentencePiece BPE (byte fallback, digits split, no text "
                                 "normalisation) on plain text files (a line each) or JSONL files (a 'text' field "
                                 "each); print vocabulary and coverage statistics.")
    train.add_argument("--input", nargs="+", required=True, type=Path, metavar="FILE", help="text or .jsonl files")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", type=Path, required=True, help="new directory for the tokenizer")
    train.add_argument("--character-coverage", type=float, default=0.9995,
                       help="fraction of characters that get their own piece (default 0.9995)")
    train.add_argument("--max-sentences", type=int, default=2_000_000,
                       help="lines sampled for training (default 2000000)")
    train.set_defaults(func=cmd_text_tokenizer_train)

    image = commands.add_parser("image-tokenizer", help="import or train a VQ-GAN image tokenizer")
    image_cmds = image.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser, required=True)
    imp = image_cmds.add_parser("import", help="import a LlamaGen, Janus or Chameleon VQ-GAN checkpoint",
                                description="Import a published VQ-GAN: llamagen (vq_ds16_c2i.pt-style state dict), "
                                "janus (Hugging Face JanusVQVAE directory), chameleon (vqgan.ckpt with vqgan.yaml "
                                "beside it, or a Hugging Face ChameleonVQVAE directory, encoder only).")
    imp.add_argument("--format", required=True, choices=["llamagen", "janus", "chameleon"])
    imp.add_argument("--src", required=True, type=Path, help="checkpoint file or model directory")
    imp.add_argument("--out", required=True, type=Path, help="new image tokenizer directory")
    imp.add_argument("--image-size", type=int, help="input resolution (default: the checkpoint's own)")
    imp.add_argument("--resize", choices=["crop", "fit"], default="crop",
                     help="crop: the checkpoint's original preprocessing, square (default); fit: omnitok's "
                     "aspect-keeping resize, grid of any shape")
    imp.set_defaults(func=cmd_image_tokenizer_import)

    tr = image_cmds.add_parser("train", help="train a VQ-GAN on a folder of images or .tar shards",
                               description="Train a VQ-GAN (L1+L2, LPIPS when weights are given, EMA codebook with "
                               "dead-code replacement, PatchGAN with adaptive weight). The output directory is the "
                               "image tokenizer, with checkpoints/, samples/ and tb/ beside it.")
    tr.add_argument("--images", nargs="+", required=True, type=Path, metavar="DIR_OR_TAR")
    tr.add_argument("--out", required=True, type=Path)
    tr.add_argument("--config", type=Path, help="YAML config (see configs/); defaults otherwise")
    tr.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    tr.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: GPU when present)")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. steps=2000 "
                    "model.codebook_size=4096 perceptual.vgg16=vgg16.pth")
    tr.set_defaults(func=cmd_image_tokenizer_train)

    audio = commands.add_parser("audio-tokenizer", help="import an audio codec (EnCodec, Mimi, DAC, WavTokenizer, "
                                "X-Codec, X-Codec2) or train an EnCodec one")
    audio_cmds = audio.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser, required=True)
    aimp = audio_cmds.add_parser("import", help="import a codec (Hugging Face directory, or a Meta EnCodec .th)",
                                 description="Import an audio codec: hf (a Hugging Face directory of EnCodec, Mimi, "
                                 "DAC, WavTokenizer, X-Codec or X-Codec2, recognised from its config.json) or "
                                 "encodec (Meta's "
                                 "encodec_24khz-d7cc33bc.th-style state dict, with --preset).")
    aimp.add_argument("--format", required=True, choices=["hf", "encodec"])
    aimp.add_argument("--src", required=True, type=Path)
    aimp.add_argument("--out", required=True, type=Path)
    aimp.add_argument("--preset", choices=["24khz", "32khz", "48khz"], help="architecture of a Meta .th checkpoint")
    aimp.add_argument("--bandwidth", type=float, help="EnCodec and X-Codec: kbps, which fixes the number of codebooks "
                      "(default: EnCodec 6 for 24 kHz = 8 codebooks, 2.2 for 32 kHz = 4, 6 for 48 kHz = 4; X-Codec the "
                      "largest)")
    aimp.add_argument("--codebooks", type=int, help="Mimi and DAC: how many codebooks to use (default: Mimi 8, DAC "
                      "all)")
    aimp.set_defaults(func=cmd_audio_tokenizer_import)
    atr = audio_cmds.add_parser("train", help="train or fine-tune an EnCodec codec on a folder of audio",
                                description="Train the EnCodec architecture: waveform L1 + multi-scale mel L1/L2, "
                                "residual VQ with EMA, k-means init and quantizer dropout, optional MS-STFT "
                                "discriminator (gan.enabled=true). The output directory is the audio tokenizer.")
    atr.add_argument("--audio", nargs="+", required=True, type=Path, metavar="DIR_OR_FILE")
    atr.add_argument("--preset", choices=["24khz", "32khz"], default="24khz")
    atr.add_argument("--out", required=True, type=Path)
    atr.add_argument("--config", type=Path, help="YAML config (see configs/)")
    atr.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    atr.add_argument("--device", help="cpu, cuda, ... (default: GPU when present)")
    atr.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="config overrides, e.g. steps=2000 model.sizes.num_filters=16 gan.enabled=true")
    atr.set_defaults(func=cmd_audio_tokenizer_train)

    tz = commands.add_parser("tokenize", help="tokenize corpora into WebDataset shards",
                             description="Read interleaved JSONL, image/audio-caption pairs (folders, CSV, JSONL) or "
                             "WebDataset tars (paths, brace patterns, pipe: URLs) and write token shards with "
                             "layout.json, manifest.json and errors.jsonl. Rerun the same command to resume.")
    tz.add_argument("--tokenizer", required=True, type=Path, help="tokenizer directory (omnitok tokenizer assemble)")
    tz.add_argument("--input", required=True, nargs="+", metavar="SPEC")
    tz.add_argument("--out", required=True, type=Path, help="shard directory")
    tz.add_argument("--workers", type=int, default=2, help="processes that read and preprocess media (default 2)")
    tz.add_argument("--batch-size", type=int, default=16, help="documents per tokenizer batch (default 16)")
    tz.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    tz.add_argument("--pair-order", choices=["caption-first", "media-first", "both"], default="caption-first",
                    help="how pairs become documents (default caption-first: text to media)")
    tz.add_argument("--seed", type=int, default=0, help="for --pair-order both")
    tz.add_argument("--loss-on", choices=["assistant", "all"], default="assistant",
                    help="which ids of a conversation carry loss: the assistant's turns (default) or all")
    tz.add_argument("--num-parts", type=int, default=1, help="split the corpus between processes (default: "
                    "WORLD_SIZE under torchrun/deepspeed, else 1)")
    tz.add_argument("--part", type=int, default=0, help="which part this process writes (default: RANK)")
    tz.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="local: a process pool here (default); ray: Ray tasks and encoder actors on a cluster "
                    "(pip install 'omnitok[ray]'); the shards are the same")
    tz.add_argument("--ray-address", help="with --engine ray: the cluster (auto or HOST:PORT; default RAY_ADDRESS, "
                    "else a local cluster)")
    tz.add_argument("--encoders", type=int, help="with --engine ray: encoder actors (default: one per GPU share, "
                    "else half the CPUs)")
    tz.add_argument("--gpus-per-encoder", type=float, help="with --engine ray: GPUs per encoder actor (default 1 "
                    "when the cluster has GPUs, else 0)")
    tz.set_defaults(func=cmd_tokenize)

    pt = commands.add_parser("pretrain", help="pretrain the decoder LM on token shards with DeepSpeed",
                             description="Train (or continue) a Hugging Face causal LM on packed token shards. Run as "
                             "is for one process, or under deepspeed / torchrun for many.")
    pt.add_argument("--config", type=Path, help="YAML run config (see configs/pretrain-*.yaml)")
    pt.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    pt.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. steps=2000 optim.lr=1e-4 zero_stage=2")
    # the deepspeed launcher appends --local_rank=N; the rank is read from LOCAL_RANK, which it also sets
    pt.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    pt.set_defaults(func=cmd_pretrain)
    ft = commands.add_parser("finetune", help="instruction-tune an exported model on conversation shards (LoRA or "
                             "full)", description="Fine-tune an omnitok export (model.init_from) on shards of "
                             "conversations: LoRA through PEFT (method=lora, default) or every weight (method=full), "
                             "with DeepSpeed ZeRO 0-3, under deepspeed / torchrun for many processes.")
    ft.add_argument("--config", type=Path, help="YAML run config (see configs/finetune-*.yaml)")
    ft.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    ft.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.init_from=runs/base/export "
                    "method=full lora.r=8 lora.token_rows=all")
    ft.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    ft.set_defaults(func=cmd_finetune)
    ex = commands.add_parser("export", help="write a run's newest checkpoint as a Hugging Face model directory")
    ex.add_argument("run", type=Path, help="the run directory (pretrain's or finetune's out)")
    ex.add_argument("--out", required=True, type=Path)
    ex.add_argument("--adapter", action="store_true", help="a LoRA run's adapter alone (PEFT's directory), not the "
                    "merged model")
    ex.set_defaults(func=cmd_export)

    sa = commands.add_parser("sample", help="sample interleaved text / image / audio from a model",
                             description="Sample from an exported model; writes PNG, WAV, text, sample.json per "
                             "sample and an index.html. Sampling settings as KEY=VALUE: text.temperature=0.7 "
                             "image.top_k=1000 image.guidance=3 image.plausibility=0.1 audio.guidance=3 "
                             "max_audio_s=10.")
    _model_arguments(sa, "an `omnitok export` directory")
    sa.add_argument("--prompt", action="append", default=[], help="text with <image:PATH> / <audio:PATH> "
                    "references, or a JSON document; repeatable")
    sa.add_argument("--prompts", type=Path, help="a file of prompts, one per line (text or JSON)")
    sa.add_argument("--out", required=True, type=Path)
    sa.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    sa.add_argument("--seed", type=int, default=0, help="sample j uses seed + j")
    sa.add_argument("--batch-size", type=int, default=8)
    sa.add_argument("--chat", action="store_true", help="prompts are chat requests (text as the user's turn, or "
                    "JSON with 'messages' ending with a user turn); each sample is the assistant's answer")
    _sampling_arguments(sa)
    sa.set_defaults(func=cmd_sample)

    ch = commands.add_parser("chat", help="talk with an instruction-tuned model in the terminal",
                             description="A multi-turn conversation: type text with <image:PATH> / <audio:PATH> "
                             "references; answers print their text and the paths of the images and sounds they hold "
                             "(written under --out). /reset forgets the history, /save PATH writes it as chat JSON, "
                             "/quit ends.")
    _model_arguments(ch, "an `omnitok finetune` export (a chat layout)")
    ch.add_argument("--out", type=Path, default=Path("chat"), help="where answers' media go (default ./chat)")
    ch.add_argument("--seed", type=int, default=0, help="answer k uses seed + k")
    _sampling_arguments(ch)
    ch.set_defaults(func=cmd_chat)

    sv = commands.add_parser("serve", help="an HTTP server: OpenAI-style API with continuous batching, a chat page",
                             description="Serve a model over HTTP: POST /v1/chat/completions (stream: true for "
                             "server-sent events), POST /v1/images/generations, POST /v1/audio/speech, "
                             "GET /v1/models, /health, /metrics, and a chat page at /. Media come inline (data URLs, "
                             "base64 WAV); no path in a request is ever read.")
    _model_arguments(sv, "an `omnitok export` (a chat model, or a base model served as continuation)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: a free one, printed)")
    sv.add_argument("--api-key", help="require this key (Authorization: Bearer KEY) on every route but /health; "
                    "default: $OMNITOK_API_KEY, else none")
    sv.add_argument("--max-rows", type=int, default=16, help="requests decoded at once (continuous batching)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting; beyond, 503 with Retry-After")
    sv.add_argument("--max-tokens", type=int, default=4096, help="the most new tokens a request may ask for")
    sv.add_argument("--max-n", type=int, default=8, help="the most images one /v1/images/generations request asks")
    sv.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may take")
    _sampling_arguments(sv)
    sv.set_defaults(func=cmd_serve)

    ev = commands.add_parser("eval", help="evaluate tokenizers, a model, or a sample directory")
    ev_cmds = ev.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser, required=True)
    et = ev_cmds.add_parser("tokenizer", help="reconstruction quality and codebook usage of image / audio tokenizers")
    et.add_argument("--image-tokenizer", type=Path)
    et.add_argument("--images", type=Path, help="folder of images")
    et.add_argument("--audio-tokenizer", type=Path)
    et.add_argument("--audio", type=Path, help="folder of audio files")
    et.add_argument("--out", type=Path, default=Path("eval_tokenizer"), help="reports and plots (default "
                    "./eval_tokenizer)")
    et.add_argument("--limit", type=int, default=256, help="at most this many files each")
    et.add_argument("--fid-features", type=Path, help="feature network for FID: a torch.export .pt2 file mapping "
                    "(1,3,H,W) images in [0,1] to (1,D)")
    et.set_defaults(func=cmd_eval_tokenizer)
    el = ev_cmds.add_parser("lm", help="per-modality loss and perplexity on held-out shards")
    el.add_argument("--model", required=True, type=Path, help="an `omnitok export` directory")
    el.add_argument("--shards", required=True, nargs="+", help="shard directories or URL patterns")
    el.add_argument("--out", type=Path, help="JSON report file")
    el.add_argument("--max-docs", type=int, default=1000)
    el.add_argument("--seq-len", type=int, default=None,
                    help="tokens per packed sequence (default: the model's max_position_embeddings)")
    el.set_defaults(func=cmd_eval_lm)
    es = ev_cmds.add_parser("samples", help="span validity and counts of an `omnitok sample` output directory; "
                                              "CLIP / CLAP scores with local models")
    es.add_argument("dir", type=Path)
    es.add_argument("--clip", type=Path, help="a local CLIP-like model directory (Hugging Face): CLIP score of the "
                                             "pictures against their prompts")
    es.add_argument("--clap", type=Path, help="a local CLAP model directory (Hugging Face): CLAP score of the sounds "
                                             "against their prompts")
    es.set_defaults(func=cmd_eval_samples)

    sh = commands.add_parser("shards", help="inspect and merge shard directories")
    sh_cmds = sh.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser, required=True)
    st = sh_cmds.add_parser("stats", help="counts, errors and a token-length histogram (text and PNG)")
    st.add_argument("dir", type=Path)
    st.add_argument("--no-plot", action="store_true", help="skip token_lengths.png")
    st.set_defaults(func=cmd_shards_stats)
    mg = sh_cmds.add_parser("merge", help="join the shard directories of parts (--num-parts) into one")
    mg.add_argument("--out", required=True, type=Path)
    mg.add_argument("parts", nargs="+", type=Path)
    mg.set_defaults(func=cmd_shards_merge)

    tok = commands.add_parser("tokenizer", help="assemble and inspect multimodal tokenizer directories")
    tok_cmds = tok.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser, required=True)
    asm = tok_cmds.add_parser("assemble", help="combine text, image and audio tokenizers under one token layout",
                              description="Write a tokenizer directory: layout.json plus the text, image and audio "
                              "tokenizers, each fingerprinted in the layout.")
    asm.add_argument("--text", required=True, type=Path, help="omnitok text tokenizer dir, SentencePiece .model, "
                     "tokenizer.json, or a Hugging Face model dir")
    asm.add_argument("--image", type=Path, help="image tokenizer directory")
    asm.add_argument("--audio", type=Path, help="audio tokenizer directory")
    asm.add_argument("--out", required=True, type=Path)
    asm.add_argument("--text-vocab-size", type=int, help="size of the text range when the LLM's embedding table is "
                     "larger than its tokenizer (default: the tokenizer's size)")
    asm.add_argument("--bos-token", help="bos token of a bare tokenizer.json")
    asm.add_argument("--eos-token", help="eos token of a bare tokenizer.json")
    asm.add_argument("--chat", action="store_true", help="hold conversations for instruction tuning: add the role "
                     "markers (<|system|>, <|user|>, <|assistant|>, <|eot|>), unless the text tokenizer is an instruct "
                     "LLM's with its own chat template, which is then used instead")
    asm.set_defaults(func=cmd_tokenizer_assemble)
    info = tok_cmds.add_parser("info", help="print a tokenizer's token layout: id ranges and fingerprints")
    info.add_argument("dir", type=Path, help="tokenizer directory (or a layout.json)")
    info.set_defaults(func=cmd_tokenizer_info)
    return parser


def _version() -> str:
    from omnitok import __version__

    return f"omnitok {__version__}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except OmnitokError as e:
        print(f"omnitok: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the writers that know what they were writing say so themselves (shards, checkpoints)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"omnitok: error: {e.strerror}" + (f" (writing {e.filename})" if e.filename else "") + ": free space, "
              "then rerun the same command (a training run: with --resume; what was complete is kept)", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"omnitok: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("omnitok: interrupted", file=sys.stderr)
        return 130
    return 0
