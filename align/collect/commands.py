"""`align collect ...`: make a collection, serve it to annotators, add AI feedback, look at it, export it.

    align collect generate prefs.sqlite --prompts prompts.jsonl --model runs/quickstart/sft --model runs/quickstart/dpo
    align collect serve prefs.sqlite --annotator alice --annotator bob --overlap 2
    align collect judge prefs.sqlite --judge runs/my_recipe/rm
    align collect status prefs.sqlite
    align collect export prefs.sqlite prefs.jsonl
"""

from __future__ import annotations

import argparse
import ipaddress

from align.annotation.store import Collection
from align.rewards import cards


def _links(collection: Collection, url: str) -> None:
    from rich.table import Table

    from align.ui import console

    table = Table(title=f"annotators of {collection.path}", title_justify="left")
    for column in ("annotator", "kind", "link (personal: send each person their own)"):
        table.add_column(column)
    for who in collection.annotators():
        progress = collection.progress(who)
        table.add_row(who.name, who.kind, f"{url}/a/{who.token}" if who.kind == "human" else
                      f"AI judge, {progress['done']} verdicts")
    console.print(table)
    console.print(f"admin page (counts, progress, agreement): {url}/admin/{collection.admin_token}", soft_wrap=True)


def _added(collection: Collection, new: dict) -> None:
    from align.ui import console

    console.print(f"[green]ok[/] {collection.path}: {new['prompts']} new prompts, {new['responses']} new responses, "
                  f"{new['pairs']} new pairs ({collection.counts()['pairs']} in all)", soft_wrap=True)


def _cmd_generate(args) -> int:
    from align.collect.generate import as_candidates, parse_source, sample_responses
    from align.data.formats import load_examples
    from align.models.generation import Decoding

    for spec in args.model:
        parse_source(spec)  # a wrong run or stage fails before the prompts are read and a model loads
    prompts = load_examples(args.prompts, "prompt", max_rows=args.max_prompts).examples
    decoding = Decoding(args.max_new_tokens, args.temperature > 0, args.temperature or 1.0, args.top_p, args.seed)
    responses = sample_responses(args.model, prompts, args.samples, decoding, args.batch_size, args.quiet)
    collection = Collection.create(args.collection)
    new = collection.add(as_candidates(prompts, responses), pairs=args.pairs, seed=args.seed)
    _added(collection, new)
    return 0


def _cmd_import(args) -> int:
    from align.collect.generate import read_candidates

    candidates = read_candidates(args.file, args.max_rows)
    collection = Collection.create(args.collection)
    new = collection.add(candidates, pairs="within", seed=args.seed)
    _added(collection, new)
    return 0


def _cmd_serve(args) -> int:
    from align.collect.server import serve
    from align.ui import console

    collection = Collection.open(args.collection)
    if args.overlap is not None:
        collection.set_overlap(args.overlap)
    for name in args.annotator or []:
        collection.add_annotator(name)
    url = f"http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}"
    _links(collection, url)
    if not _is_loopback(args.host):
        console.print(f"[yellow]note:[/] serving on {args.host}: anyone who can reach it and has a link can "
                      "annotate; the links' tokens are the only protection, and traffic is not encrypted")
    console.print(f"{collection.counts()['pairs']} pairs, each for {collection.overlap} annotator(s); Ctrl+C stops")
    serve(args.collection, host=args.host, port=args.port, quiet=not args.access_log)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _cmd_annotators(args) -> int:
    collection = Collection.open(args.collection)
    for name in args.add or []:
        collection.add_annotator(name)
    _links(collection, args.url.rstrip("/"))
    return 0


def _cmd_judge(args) -> int:
    from align.collect.judge import judge_collection
    from align.ui import console

    result = judge_collection(Collection.open(args.collection), args.judge, args.tie_margin, args.quiet)
    console.print(f"[green]ok[/] {result['judge']} judged {result['pairs']} pairs: A {result['a']}, "
                  f"B {result['b']}, tie {result['tie']}")
    return 0


def _cmd_status(args) -> int:
    from align.collect.status import status_tables
    from align.ui import console

    for table in status_tables(Collection.open(args.collection)):
        console.print(table)
    return 0


def _cmd_export(args) -> int:
    from align.collect.export import export_collection
    from align.ui import console

    fmt = args.format or ("jsonl" if args.out.endswith(".jsonl") else "datasets")
    summary = export_collection(Collection.open(args.collection), args.out, args.kind, args.aggregate, args.who, fmt,
                                args.complete_only)
    left_out = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in summary["left_out"].items()) or "none"
    console.print(f"[green]ok[/] {args.out}: {summary['rows']} {args.kind} rows from {summary['verdicts']} verdicts "
                  f"on {summary['pairs_judged']} of {summary['pairs']} pairs; left out: {left_out}. A {args.kind} "
                  f"stage reads it with `data: {{path: {args.out}}}`", soft_wrap=True)
    return 0


def add_parser(sub) -> None:
    """`align collect` and its subcommands, on the main parser's subparsers `sub`."""
    collect = sub.add_parser("collect", help="collect pairwise preferences from people (a local web app) and AI "
                                             "judges, and export them for dpo/rank stages")
    commands = collect.add_subparsers(dest="collect_command", required=True)

    p = commands.add_parser("generate", help="sample responses per prompt from models or run stages into a "
                                             "collection (made where it does not exist; added to where it does)")
    p.add_argument("collection", metavar="COLLECTION", help="the collection file, e.g. prefs.sqlite")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="prompts: .txt, JSONL prompts, MT-Bench questions, or any SFT/preference file (its prompts)")
    p.add_argument("--model", action="append", required=True, metavar="SOURCE",
                   help="RUN/STAGE (e.g. runs/quickstart/dpo, RUN/base) or a model (hub id, folder, .gguf, "
                        "builtin:NAME); give it once or twice")
    p.add_argument("-n", "--samples", type=int, default=2, metavar="N", help="responses per prompt per source")
    p.add_argument("--pairs", choices=["all", "across"], default="all",
                   help="compare every two responses to a prompt, or only responses of different sources")
    p.add_argument("--max-prompts", type=int, metavar="N")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (then one sample per source)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_generate)

    p = commands.add_parser("import", help="add existing pairs: align eval's pairs.jsonl, or the responses of any "
                                           "preference or ranked file (its labels ignored)")
    p.add_argument("collection", metavar="COLLECTION")
    p.add_argument("file")
    p.add_argument("--max-rows", type=int, metavar="N")
    p.add_argument("--seed", type=int, default=0, help="orders the pairs for annotators")
    p.set_defaults(fn=_cmd_import)

    p = commands.add_parser("serve", help="the annotation web app: a personal link per annotator, an admin page")
    p.add_argument("collection", metavar="COLLECTION")
    p.add_argument("--annotator", action="append", metavar="NAME", help="add an annotator (repeat for several)")
    p.add_argument("--overlap", type=int, metavar="K", help="how many people judge each pair (kept in the "
                                                             "collection; default 1)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(fn=_cmd_serve)

    p = commands.add_parser("annotators", help="list annotators and their links; add some")
    p.add_argument("collection", metavar="COLLECTION")
    p.add_argument("--add", nargs="+", metavar="NAME")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="where the app is served, for the links")
    p.set_defaults(fn=_cmd_annotators)

    p = commands.add_parser("judge", help="AI feedback: a reward model judges every pair, as an annotator of its own")
    p.add_argument("collection", metavar="COLLECTION")
    p.add_argument("--judge", required=True, metavar="RM", help="an rm stage (RUN/STAGE), a reward card "
                                                                 f"({', '.join(cards())}) or a rule file")
    p.add_argument("--tie-margin", type=float, default=0.0, help="a reward gap at most this large is a tie")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=_cmd_judge)

    p = commands.add_parser("status", help="counts, per-annotator progress and agreement")
    p.add_argument("collection", metavar="COLLECTION")
    p.set_defaults(fn=_cmd_status)

    p = commands.add_parser("export", help="verdicts as preference pairs or ranked lists for a dpo/rank stage",
                            formatter_class=argparse.RawDescriptionHelpFormatter, description=EXPORT_RULES)
    p.add_argument("collection", metavar="COLLECTION")
    p.add_argument("out", metavar="OUT", help="a .jsonl file, or a folder (a datasets dataset)")
    p.add_argument("--kind", choices=["preference", "ranked"], default="preference")
    p.add_argument("--aggregate", choices=["majority", "all"], default="majority")
    p.add_argument("--who", default="humans", metavar="WHO", help="humans, ai, all, or annotator names (a,b)")
    p.add_argument("--format", choices=["jsonl", "datasets"], help="default: jsonl for a .jsonl OUT, else datasets")
    p.add_argument("--complete-only", action="store_true", help="only pairs that reached their overlap (judged by "
                                                                  "as many people as it asks for)")
    p.set_defaults(fn=_cmd_export)


EXPORT_RULES = """\
majority: a pair gives one row when one of its choices (A, B, tie, both bad) has more verdicts than any
          other and that choice is A or B; a pair whose plurality is tie or both bad, or whose top count
          is shared, gives none.
all:      every verdict for A or B is a row of its own; ties and both-bad verdicts give none.
ranked:   each prompt's compared responses scored by net win rate, (wins - losses) / comparisons, over
          the outcomes above; a prompt gives a list when at least two scores differ.
complete: with --complete-only, only pairs judged by as many people as the overlap asks for; the
          summary counts the pairs it left out as "incomplete".
"""
