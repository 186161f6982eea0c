"""`mplug data ...`: data preparation commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.synthetic import make_scenes, vocabulary_texts
from data_prep.tokenizer import shard_captions, train_wordpiece


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data", help="prepare data: download URL lists, convert annotations, synthetic data, tokenizers"
    )
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    tokenizer = commands.add_parser(
        "tokenizer", help="train an uncased WordPiece vocabulary from shard captions or text files"
    )
    tokenizer.add_argument("texts", nargs="*", type=Path, help="text files with one caption per line")
    tokenizer.add_argument("--shards", action="append", default=[], metavar="SPEC",
                           help="captions (KEY.txt) of shards: a manifest, folder, glob or brace pattern (repeatable)")
    tokenizer.add_argument("--max-captions", type=int, default=None, metavar="N",
                           help="read at most N captions from the shards")
    tokenizer.add_argument("--output", required=True, type=Path, help="directory BertTokenizerFast loads")
    tokenizer.add_argument("--vocab-size", type=int, default=30522)
    tokenizer.add_argument("--synthetic", type=int, default=0, metavar="N",
                           help="also train on the captions of N synthetic scenes")
    tokenizer.set_defaults(handler=run_tokenizer)
    synthetic = commands.add_parser(
        "synthetic", help="write coloured-shape images with a URL list, captions, VQA and RefCOCO annotations"
    )
    synthetic.add_argument("--output", required=True, type=Path, help="directory to write the data set into")
    synthetic.add_argument("--num-samples", required=True, type=int, help="number of images (80/10/10 train/val/test)")
    synthetic.add_argument("--seed", type=int, default=0, help="the same seed writes byte-identical files")
    synthetic.add_argument("--image-size", type=int, default=128, help="side of the square images in pixels")
    synthetic.add_argument("--base-url", default="http://127.0.0.1:8000",
                           help="where `mplug data serve DIR` serves DIR; the URL list points there")
    synthetic.set_defaults(handler=run_synthetic)
    register_synthetic_video(commands)
    register_convert(commands)
    register_download(commands)
    register_download_videos(commands)


def read_lines(paths: list[Path]):
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"error: caption file {path} does not exist")
        with path.open(encoding="utf-8") as handle:
            yield from (line.strip() for line in handle if line.strip())


def run_tokenizer(args: argparse.Namespace) -> int:
    if not args.texts and not args.shards and not args.synthetic:
        raise SystemExit("error: give --shards SPEC, caption files or --synthetic N, otherwise there is nothing to train on")
    texts = list(read_lines(args.texts))
    if args.shards:
        try:
            texts += list(shard_captions(args.shards, args.max_captions))
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {error}") from None
    if args.synthetic:
        texts += vocabulary_texts() + [scene.caption for scene in make_scenes(args.synthetic)]
    tokenizer = train_wordpiece(texts, args.output, args.vocab_size)
    print(f"trained a WordPiece vocabulary of {len(tokenizer)} entries from {len(texts)} texts -> {args.output}")
    return 0


def run_synthetic(args: argparse.Namespace) -> int:
    from data_prep.synthetic_export import write_synthetic

    try:
        dataset = write_synthetic(args.output, args.num_samples, args.seed, args.image_size, args.base_url)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    splits = ", ".join(f"{count} {split}" for split, count in dataset.splits.items())
    print(f"wrote {dataset.num_samples} synthetic images ({splits}), {dataset.num_captions} captions, "
          f"{dataset.num_questions} questions and {dataset.num_referrals} referred shapes -> {dataset.root}; "
          f"URL list {dataset.urls_parquet} points at {dataset.base_url}")
    return 0


def register_synthetic_video(commands: argparse._SubParsersAction) -> None:
    video = commands.add_parser(
        "synthetic-video", help="write moving-shape mp4 clips as video task shards, pretraining shards and a URL list",
        description="Write clips of a coloured shape moving left, right, up or down: OUTPUT/tasks/<task>/"
        "{train,val,test} shards of video_qa, video_caption (also video retrieval) and "
        "action_classification; OUTPUT/pretrain shards with captions; with --url-clips N, "
        "OUTPUT/webvid/videos/*.mp4 and a WebVid-style OUTPUT/webvid/webvid.csv.",
    )
    video.add_argument("--output", required=True, type=Path, help="directory to write into")
    video.add_argument("--train-clips", type=int, default=96, help="task clips in train (default: %(default)s)")
    video.add_argument("--eval-clips", type=int, default=30, help="task clips in val and in test (default: %(default)s)")
    video.add_argument("--pretrain-clips", type=int, default=256, help="clips of the pretraining shards, 0 for none "
                       "(default: %(default)s)")
    video.add_argument("--url-clips", type=int, default=0, help="clips written as files with a WebVid-style URL list "
                       "(default: %(default)s)")
    video.add_argument("--base-url", default="http://127.0.0.1:8000",
                       help="where `mplug data serve OUTPUT/webvid` serves the clips (default: %(default)s)")
    video.add_argument("--frames", type=int, default=8, help="frames a clip (default: %(default)s)")
    video.add_argument("--size", type=int, default=64, help="frame side in pixels, even (default: %(default)s)")
    video.add_argument("--seed", type=int, default=0, help="the same seed writes the same clips")
    video.set_defaults(handler=run_synthetic_video)


def run_synthetic_video(args: argparse.Namespace) -> int:
    from data_prep.synthetic_video import (
        write_video_pretrain_shards,
        write_video_task_shards,
        write_video_url_list,
    )

    shape = {"seed": args.seed, "frames": args.frames, "size": args.size}
    try:
        tasks = write_video_task_shards(args.output / "tasks", train_clips=args.train_clips,
                                        eval_clips=args.eval_clips, **shape)
        for task, folder in tasks.items():
            print(f"{task}: {folder}")
        if args.pretrain_clips:
            print(f"pretraining shards: {write_video_pretrain_shards(args.output / 'pretrain', args.pretrain_clips, **shape)}")
        if args.url_clips:
            csv_path = write_video_url_list(args.output / "webvid", args.url_clips, base_url=args.base_url, **shape)
            print(f"URL list: {csv_path} (serve {csv_path.parent} at {args.base_url})")
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return 0


def register_convert(commands: argparse._SubParsersAction) -> None:
    """`mplug data convert FORMAT`: one sub-command per converter of `data_prep.convert`."""
    from data_prep.convert import CONVERTERS

    convert = commands.add_parser(
        "convert", help="convert a fine-tuning data set's official annotations into webdataset shards"
    )
    formats = convert.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for converter in CONVERTERS.values():
        parser = formats.add_parser(converter.name, help=converter.help, description=converter.help)
        parser.add_argument("--output", required=True, type=Path,
                            help=converter.output_help or "writes OUTPUT/<split>/*.tar + manifest.json, "
                            "OUTPUT/splits.json, OUTPUT/report.json")
        if converter.media:  # None: a converter of URL lists, which reads no media files
            flags = dict.fromkeys([f"--{converter.media}-root", "--image-root"])  # video formats take either
            parser.add_argument(*flags, dest="media_root", action="append", required=True, type=Path, metavar="DIR",
                                help=f"folder of the {converter.media}s (repeatable: searched in turn)")
        for option in converter.options:
            parser.add_argument(option.flag, required=option.required, action="append" if option.many else "store",
                                type=Path if option.is_path else str, default=option.default, help=option.help)
        parser.add_argument("--strict", action="store_true",
                            help="stop at the first malformed record or missing file instead of skipping it")
        if converter.media:
            parser.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per tar (default 1000)")
        parser.add_argument("--limit", type=int, default=None, metavar="N", help="at most N samples per split")
        parser.set_defaults(handler=run_convert, converter=converter)


def run_convert(args: argparse.Namespace) -> int:
    from data_prep.convert import ConversionError, InputError

    converter = args.converter
    options = {o.dest: getattr(args, o.dest) for o in converter.options if getattr(args, o.dest) is not None}
    if converter.media:
        options.update({f"{converter.media}_root": args.media_root, "shard_size": args.shard_size})
    try:
        report = converter.function(output=args.output, **options, strict=args.strict, limit=args.limit)
    except (InputError, ConversionError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    print(report.summary())
    if not report.total_converted:
        print(f"error: no sample was converted; see {args.output}/report.json", file=sys.stderr)
        return 1
    return 0


def register_download(commands: argparse._SubParsersAction) -> None:
    from data_prep.download import RESIZE_MODES, DownloadOptions

    defaults = DownloadOptions(url_list="", output="")
    download = commands.add_parser(
        "download", help="download a URL list into webdataset shards with img2dataset on Ray",
        description="Download the images of a URL list into webdataset shards (KEY.jpg, KEY.txt, "
        "KEY.json) with img2dataset on Ray. Rerunning into the same folder fetches only shards "
        "not yet done. Writes OUTPUT/summary.json and OUTPUT/manifest.json; exits 1 when shards "
        "are still incomplete after the retries.",
    )
    add_url_list_arguments(download, defaults, "image")
    download.add_argument("--image-size", type=int, default=defaults.image_size,
                          help="side of the resized images in pixels (default: %(default)s)")
    download.add_argument("--resize-mode", choices=RESIZE_MODES, default=defaults.resize_mode,
                          help="img2dataset's resize mode; border (its default) fits the image into "
                          "the square and pads it white (default: %(default)s)")
    download.add_argument("--retries", type=int, default=defaults.retries,
                          help="passes over shards a dead worker left without stats (default: %(default)s)")
    download.set_defaults(handler=run_download)
    serve = commands.add_parser("serve", help="serve a folder over HTTP on 127.0.0.1 until Ctrl-C")
    serve.add_argument("root", type=Path, metavar="DIR", help="the folder to serve")
    serve.add_argument("--port", type=int, default=8000,
                       help="port to listen on, 0 for any free one (default: %(default)s, "
                       "where `mplug data synthetic` points its URL list)")
    serve.set_defaults(handler=run_serve)


def add_url_list_arguments(parser: argparse.ArgumentParser, defaults, media: str) -> None:
    """The arguments `download` and `download-videos` share: the URL list, the output, Ray."""
    from data_prep.download import INPUT_FORMATS

    parser.add_argument("url_list", metavar="URL_LIST",
                        help="parquet/csv/tsv/json file or folder of them, a path or fsspec URL")
    parser.add_argument("--output", required=True, help="folder for the shards, a path or fsspec URL")
    parser.add_argument("--input-format", choices=INPUT_FORMATS, default=None,
                        help="format of the URL list (default: from its file extension)")
    parser.add_argument("--url-col", default=defaults.url_col, help=f"column of the {media} URLs (default: %(default)s)")
    parser.add_argument("--caption-col", default=defaults.caption_col,
                        help="column of the captions, saved as KEY.txt (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=defaults.processes,
                        help="CPUs of the local Ray, one shard each at a time; with --ray-address "
                        "the cluster's CPUs decide (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="downloads in flight per shard (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size,
                        help="samples per shard (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=defaults.timeout,
                        help="seconds to wait for a server to connect or send (default: %(default)s)")
    parser.add_argument("--ray-address", default=None,
                        help="address of a running Ray cluster (default: the cluster of the Ray job this runs in, else a new local Ray)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def finish_download(args: argparse.Namespace, job, table) -> int:
    """Run a download job (`job()` -> its summary) and print the summary's `table`; the exit status."""
    from data_prep.download import DownloadInputError

    try:
        summary = job()
    except (DownloadInputError, ConnectionError) as error:
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished shards stay in {args.output} (see its summary.json); "
              "the same command fetches the rest", file=sys.stderr)
        return 130
    print(f"downloaded {args.url_list} -> {args.output}:")
    print(table(summary))
    return 1 if summary["incomplete_shards"] else 0


def run_download(args: argparse.Namespace) -> int:
    from data_prep.download import DownloadOptions, download
    from data_prep.download_summary import format_summary

    options = DownloadOptions(
        url_list=args.url_list, output=args.output, input_format=args.input_format,
        url_col=args.url_col, caption_col=args.caption_col, image_size=args.image_size,
        resize_mode=args.resize_mode, processes=args.processes, threads=args.threads,
        shard_size=args.shard_size, timeout=args.timeout, retries=args.retries,
        ray_address=args.ray_address, progress=not args.no_progress, verbose=args.verbose,
    )
    return finish_download(args, lambda: download(options), format_summary)


def run_serve(args: argparse.Namespace) -> int:
    import time

    from data_prep.serve import LoopbackServer

    try:
        server = LoopbackServer(args.root, port=args.port).start()
    except (NotADirectoryError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"serving {args.root} at {server.base_url}/ (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def register_download_videos(commands: argparse._SubParsersAction) -> None:
    from data_prep.video_download import VideoDownloadOptions

    defaults = VideoDownloadOptions(url_list="", output="")
    videos = commands.add_parser(
        "download-videos", help="download a video URL list into webdataset shards, one Ray task per shard",
        description="Download the videos of a URL list into webdataset shards (KEY.mp4 or the "
        "container's own extension, KEY.txt, KEY.json with duration, frames, width, height), each "
        "checked to decode with PyAV. Rerunning into the same folder fetches only shards not yet "
        "done. Writes OUTPUT/summary.json and OUTPUT/manifest.json; exits 1 when shards are still "
        "incomplete after the retries.",
    )
    add_url_list_arguments(videos, defaults, "video")
    videos.add_argument("--key-col", default=defaults.key_col,
                        help="column of the sample keys, used when present (default: %(default)s)")
    videos.add_argument("--url-retries", type=int, default=defaults.url_retries,
                        help="extra tries of a URL that timed out or answered 5xx/429, with backoff (default: %(default)s)")
    videos.add_argument("--retries", type=int, default=defaults.retries,
                        help="extra runs of a shard task that failed or whose worker died (default: %(default)s)")
    videos.add_argument("--max-bytes", type=int, default=defaults.max_bytes,
                        help="larger videos are not fetched (default: %(default)s)")
    videos.set_defaults(handler=run_download_videos)


def run_download_videos(args: argparse.Namespace) -> int:
    from data_prep.video_download import VideoDownloadOptions, download_videos, format_video_summary

    options = VideoDownloadOptions(
        url_list=args.url_list, output=args.output, input_format=args.input_format, url_col=args.url_col,
        caption_col=args.caption_col, key_col=args.key_col, shard_size=args.shard_size,
        processes=args.processes, threads=args.threads, timeout=args.timeout, url_retries=args.url_retries,
        retries=args.retries, max_bytes=args.max_bytes, ray_address=args.ray_address,
        progress=not args.no_progress,
    )
    return finish_download(args, lambda: download_videos(options), format_video_summary)
