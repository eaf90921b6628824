"""The embedded demo dataset: query-ad pairs from four markets whose relevance rules differ.

    python -m pipeline.synthetic --out runs/demo/raw/ads.parquet [--rows-per-scenario 3000 --seed 7]

    generate(Path("ads.parquet"), SyntheticConfig(rows_per_scenario=3000, seed=7, label_noise=0.05))

Columns: query, title, description, url, label (int8), scenario, request_id, ad_id. In every market an
ad is relevant only if its product matches the query's product (synonyms count: "sneakers" matches
"running shoes"; a related product such as "hiking boots" does not). Each market then adds a rule, every
one visible in the text:

    us  rival brands are fine, but a query with price intent ("cheap", "deals on") needs a price in the ad
    uk  a query that names a brand needs an ad of that brand (rival-brand ads are irrelevant)
    de  the ad must show it ships to Germany ("Versand nach Deutschland", "Ships to Germany", a .de URL)
    jp  the ad needs a price or discount term, or else the query's own brand

So one pair can be relevant in us and irrelevant in uk or de: the tasks genuinely differ and partly
conflict. The share of same-product ads is set per market so that ~25% of pairs are relevant before
``label_noise`` flips labels at random. Generation is vectorised and streamed in chunks, so millions of
rows are cheap; the output is identical for the same config.

Two dials, for the quality benchmark (``benchmarks.quality --grid``); at their defaults (conflict None,
imbalance 1) the output is exactly the demo data above, by the same code path:

    conflict    None: the four market rules above. A number c in [0, 1] replaces them with one shared
                rule that the markets apply, or invert, on a visible slice of the catalogue:
                    g(pair) = the ad shows a price or discount ("Now $49", "Save 30%")
                    us, de  relevant = product matches and g                      (everywhere)
                    uk, jp  relevant = product matches and (not g if the query's product is one of
                            the first k = round(16 c) products of CONFLICT_ORDER, else g)
                So c is the share of the catalogue (16 products) on which the two groups of markets hold
                opposite rules: 0 is one task in four markets, 1 is opposite rules for every product, and
                the disagreement grows monotonically with c (the slices are nested; k rounds to sixteenths,
                ``conflict_products`` gives the realised share). Everything the rule reads (price text,
                product) is in the text, so each market's rule is learnable given its task id; the market
                itself shows in the text only partly (currency of a "Now $49" price, shipping lines), as
                in the demo. The ~25% positive rate is kept per market as before.
    imbalance   The largest scenario's rows over the smallest one's (>= 1). Scenario i of T (market order
                us, uk, de, jp) gets round(rows_per_scenario · imbalance^(-i/(T-1))) rows, so us keeps
                rows_per_scenario and jp gets rows_per_scenario / imbalance (10: 3000 / 1392 / 646 / 300).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kernel.atomic import atomic_path
from kernel.config import SyntheticConfig
from kernel.logs import add_logging_args, setup_from_args

log = logging.getLogger(__name__)

MARKETS = ("us", "uk", "de", "jp")
TARGET_POSITIVE_RATE = 0.25
CHUNK_ROWS = 65536  # rows per market per generated chunk

# Products as (synonyms); consecutive pairs are related (shoes/boots, headphones/speakers, ...).
PRODUCTS = [
    ["running shoes", "sneakers", "trainers", "jogging shoes"], ["hiking boots", "trekking boots", "walking boots"],
    ["headphones", "earbuds", "wireless headphones", "headset"], ["bluetooth speaker", "portable speaker", "smart speaker"],
    ["laptop", "notebook computer", "ultrabook"], ["tablet", "android tablet", "drawing tablet"],
    ["smartwatch", "fitness tracker watch", "smart watch"], ["wristwatch", "analog watch", "chronograph watch"],
    ["coffee maker", "espresso machine", "coffee machine"], ["electric kettle", "tea kettle", "water boiler"],
    ["backpack", "rucksack", "daypack"], ["suitcase", "carry-on luggage", "trolley case"],
    ["digital camera", "mirrorless camera", "dslr camera"], ["camera lens", "zoom lens", "prime lens"],
    ["office chair", "ergonomic chair", "desk chair"], ["standing desk", "computer desk", "writing desk"],
]
BRANDS_PER_GROUP = 5  # brands shared by each related pair of products (so a brand alone proves little)
BRANDS = [
    "Stridex", "Peakline", "Trailform", "Velocita", "Norrun", "Sonora", "Auralis", "Bassik", "Echovia", "Tonmeister",
    "Novabook", "Lumetra", "Corelink", "Zentro", "Aerotab", "Chronix", "Pulsewear", "Tempora", "Horologe", "Vitalis",
    "Brewell", "Kaffera", "Steamly", "Aromi", "Heatwave", "Packrite", "Roamer", "Voyagen", "Carryall", "Tundra",
    "Optika", "Lensmark", "Framewise", "Pixelon", "Aperto", "Sitwell", "Ergonova", "Deskform", "Posturo", "Workline",
]
PRICE_INTENT = ["cheap", "discount", "best price", "deals on", "sale", "budget", "affordable"]
QUERY_PREFIX = ["best", "new", "buy", "top rated", "lightweight", "professional"]
QUERY_SUFFIX = ["for men", "for women", "for kids", "2024", "waterproof", "black", "review"]
TITLE_SUFFIX = ["2024 Model", "New", "Limited Edition", "Black", "White", "Grey", "Pro", "Lite", "Plus"]
GENERIC = ["Official store.", "Top rated by customers.", "Order today.", "Two-year warranty.", "Fast dispatch.",
           "Free returns.", "Great reviews."]
CURRENCY = {"us": ("$", 1), "uk": ("£", 1), "de": ("€", 1), "jp": ("¥", 100)}
SHIPPING = {  # what an ad says about where it ships; index = destination market
    "us": ["Free shipping in the US.", "Ships within the USA."],
    "uk": ["Free UK delivery.", "Ships to the United Kingdom."],
    "de": ["Versand nach Deutschland.", "Ships to Germany.", "Kostenloser Versand in DE."],
    "jp": ["Ships from Tokyo.", "Delivery in Japan only."],
}
TLD = {"us": "com", "uk": "co.uk", "de": "de", "jp": "jp"}
# The conflict dial: markets that invert the shared rule on the conflict slice, and the fixed order in
# which products join that slice as the dial grows (a fixed shuffle: related products join at different
# points, so the slice is not one product family).
OPPOSED = ("uk", "jp")
CONFLICT_ORDER = (5, 12, 0, 9, 14, 3, 10, 7, 1, 15, 6, 11, 2, 13, 8, 4)

_NULL = pa.scalar(None, pa.string())
SCHEMA = pa.schema([("query", pa.string()), ("title", pa.string()), ("description", pa.string()),
                    ("url", pa.string()), ("label", pa.int8()), ("scenario", pa.string()),
                    ("request_id", pa.string()), ("ad_id", pa.string())])


def _pick(rng: np.random.Generator, options: list[str], n: int) -> pa.Array:
    return pa.array(options, pa.string()).take(pa.array(rng.integers(0, len(options), n)))


def _maybe(values: pa.Array, present: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(present), values, _NULL)


def _join(parts: list[pa.Array], sep: str) -> pa.Array:
    return pc.binary_join_element_wise(*parts, sep, null_handling="skip")


def _numbers(prefix: str, values: np.ndarray, suffix: str = "") -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(values), pa.string()), suffix, "")


def _synonym(rng: np.random.Generator, product: np.ndarray) -> np.ndarray:
    """Index into the flattened synonym list: a random synonym of each row's product."""
    sizes = np.array([len(p) for p in PRODUCTS])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return starts[product] + (rng.random(len(product)) * sizes[product]).astype(np.int64)


def check_dials(cfg: SyntheticConfig) -> None:
    """ConfigError unless conflict is None or in [0, 1] and imbalance >= 1."""
    from kernel.errors import ConfigError

    if cfg.conflict is not None and not 0.0 <= cfg.conflict <= 1.0:
        raise ConfigError(f"data.synthetic.conflict: must be in [0, 1] (or null), got {cfg.conflict}")
    if not cfg.imbalance >= 1.0:
        raise ConfigError(f"data.synthetic.imbalance: must be >= 1 (largest / smallest scenario), got {cfg.imbalance}")


def conflict_products(conflict: float) -> tuple[int, ...]:
    """Product indices on which the OPPOSED markets invert the shared rule: the first round(16 c) of
    CONFLICT_ORDER (so the realised share of the catalogue is len(...) / 16)."""
    return CONFLICT_ORDER[: round(conflict * len(PRODUCTS))]


def scenario_rows(cfg: SyntheticConfig) -> dict[str, int]:
    """Rows per market: rows_per_scenario for us, down to rows_per_scenario / imbalance for jp (geometric)."""
    n, k = cfg.rows_per_scenario, len(MARKETS) - 1
    if cfg.imbalance == 1.0:
        return {m: n for m in MARKETS}
    return {m: max(1, round(n * cfg.imbalance ** (-i / k))) for i, m in enumerate(MARKETS)}


def dial_rule(market: str, has_price: np.ndarray, q_product: np.ndarray, conflict: float) -> np.ndarray:
    """The conflict dial's relevance rule for product-matching pairs (bool per row), see the module doc."""
    if market not in OPPOSED:
        return has_price.copy()
    inverted = np.isin(q_product, conflict_products(conflict))  # the conflict slice of the catalogue
    return np.where(inverted, ~has_price, has_price)


def market_chunk(market: str, n: int, first_row: int, cfg: SyntheticConfig, chunk: int) -> pa.Table:
    """``n`` rows of one market (rows ``first_row ...`` of it); a pure function of its arguments."""
    m = MARKETS.index(market)
    rng = np.random.default_rng([cfg.seed, m, chunk])
    n_products, synonyms = len(PRODUCTS), pa.array([s for p in PRODUCTS for s in p])
    # --- the query: [price intent] [prefix] [brand] product [suffix]
    q_product = rng.integers(0, n_products, n)
    q_has_brand = rng.random(n) < 0.65
    q_brand = (q_product // 2) * BRANDS_PER_GROUP + rng.integers(0, BRANDS_PER_GROUP, n)
    price_intent = rng.random(n) < 0.3
    query = _join([
        _maybe(_pick(rng, PRICE_INTENT, n), price_intent),
        _maybe(_pick(rng, QUERY_PREFIX, n), ~price_intent & (rng.random(n) < 0.25)),
        _maybe(pa.array(BRANDS).take(pa.array(q_brand)), q_has_brand).cast(pa.string()),
        synonyms.take(pa.array(_synonym(rng, q_product))),
        _maybe(_pick(rng, QUERY_SUFFIX, n), rng.random(n) < 0.25),
    ], " ")
    query = pc.utf8_lower(query)
    # --- the ad's visible facts, drawn before deciding whether its product matches
    desc_present = rng.random(n) >= 0.08
    has_price = (rng.random(n) < 0.45) & desc_present
    dest = np.where(rng.random(n) < 0.6, m, rng.integers(0, len(MARKETS), n))  # where it ships
    ship_shown = (rng.random(n) < 0.85) & desc_present
    url_present = rng.random(n) >= 0.08
    same_brand = q_has_brand & (rng.random(n) < 0.5)
    brand_if_match = np.where(same_brand, q_brand, (q_product // 2) * BRANDS_PER_GROUP
                              + rng.integers(0, BRANDS_PER_GROUP, n))
    brand_match = q_has_brand & (brand_if_match == q_brand)
    ships_de = (dest == MARKETS.index("de")) & (ship_shown | url_present)
    if cfg.conflict is None:  # the demo's four market rules
        rule = {  # relevance if the product matches
            "us": ~price_intent | has_price,
            "uk": ~q_has_brand | brand_match,
            "de": ships_de,
            "jp": has_price | brand_match,
        }[market]
    else:  # the conflict dial: one shared rule, inverted by OPPOSED markets on a slice of the catalogue
        rule = dial_rule(market, has_price, q_product, cfg.conflict)
    p_same = min(0.95, TARGET_POSITIVE_RATE / max(rule.mean(), 1e-6))  # tunes the positive rate to ~25%
    product_match = rng.random(n) < p_same
    related = rng.random(n) < 0.5
    other = (q_product + rng.integers(1, n_products, n)) % n_products  # any other product
    a_product = np.where(product_match, q_product, np.where(related, q_product ^ 1, other))
    a_brand = np.where(product_match, brand_if_match,
                       (a_product // 2) * BRANDS_PER_GROUP + rng.integers(0, BRANDS_PER_GROUP, n))
    label = (product_match & rule).astype(np.int8)
    flip = rng.random(n) < cfg.label_noise
    label[flip] = 1 - label[flip]
    # --- the ad's text
    brand_names = pa.array(BRANDS).take(pa.array(a_brand))
    noun = synonyms.take(pa.array(_synonym(rng, a_product)))
    letters = _pick(rng, list("ASXQZRTMKV"), n)
    model = pc.binary_join_element_wise(letters, pc.cast(pa.array(rng.integers(100, 9999, n)), pa.string()), "")
    title = _join([brand_names, pc.utf8_title(noun), model, _maybe(_pick(rng, TITLE_SUFFIX, n), rng.random(n) < 0.5)],
                  " ")
    symbol, scale = CURRENCY[market]
    amount = _numbers(symbol, rng.integers(15, 900, n) * scale)
    price = pc.if_else(pa.array(rng.random(n) < 0.5),  # "Now $49" or "Save 30%"
                       _join([_pick(rng, ["Now", "From", "Sale:", "Only"], n), amount], " "),
                       _numbers("Save ", rng.integers(10, 60, n), "%"))
    price = pc.binary_join_element_wise(price, ".", "")
    ship_text = pa.concat_arrays([_pick(rng, SHIPPING[k], n) for k in MARKETS]).take(
        pa.array(dest * n + np.arange(n)))
    description = _join([_maybe(price, has_price), _maybe(ship_text, ship_shown), _pick(rng, GENERIC, n)], " ")
    description = pc.if_else(pa.array(desc_present), description, "")
    slug = pc.replace_substring(noun, " ", "-")
    tld = pa.array([TLD[k] for k in MARKETS]).take(pa.array(dest))
    host = _join([pa.repeat(pa.scalar("www"), n), pc.utf8_lower(brand_names), tld], ".")
    url = pc.if_else(pa.array(url_present), _join([host, slug], "/"), "")
    rows = np.arange(first_row, first_row + n)
    return pa.Table.from_arrays([
        query, title, description, url, pa.array(label), pa.repeat(pa.scalar(market), n),
        _numbers(f"{market}-q", rows), _numbers("ad-", rng.integers(0, 10**9, n)),
    ], schema=SCHEMA)


def generate(out_path: Path, cfg: SyntheticConfig) -> Path:
    """Write the demo dataset to one Parquet file (atomically); markets interleaved chunk by chunk.

    Chunk ``c`` holds rows [c·CHUNK_ROWS, (c+1)·CHUNK_ROWS) of every market that still has rows (all of
    them when balanced, the demo's case), so a market's rows never depend on the other markets' sizes.
    """
    check_dials(cfg)
    out_path = Path(out_path)
    sizes = scenario_rows(cfg)
    n = max(sizes.values())
    with atomic_path(out_path) as tmp, pq.ParquetWriter(tmp, SCHEMA) as writer:
        for chunk, start in enumerate(range(0, n, CHUNK_ROWS)):
            parts = pa.concat_tables([market_chunk(mk, min(CHUNK_ROWS, sizes[mk] - start), start, cfg, chunk)
                                      for mk in MARKETS if sizes[mk] > start])
            order = np.random.default_rng([cfg.seed, 99, chunk]).permutation(parts.num_rows)
            writer.write_table(parts.take(pa.array(order)))
    return out_path


def main(argv: list[str] | None = None) -> int:
    d = SyntheticConfig()
    parser = argparse.ArgumentParser(prog="python -m pipeline.synthetic", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", required=True, help="Parquet file to write")
    parser.add_argument("--rows-per-scenario", type=int, default=d.rows_per_scenario)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--label-noise", type=float, default=d.label_noise)
    parser.add_argument("--conflict", type=float, default=d.conflict,
                        help="0..1: one shared rule, inverted by uk and jp on this share of products (default: the demo rules)")
    parser.add_argument("--imbalance", type=float, default=d.imbalance,
                        help="largest / smallest market's rows (default 1: balanced)")
    add_logging_args(parser)
    args = parser.parse_args(argv)
    setup_from_args(args, "generate")
    cfg = SyntheticConfig(rows_per_scenario=args.rows_per_scenario, seed=args.seed, label_noise=args.label_noise,
                          conflict=args.conflict, imbalance=args.imbalance)
    path = generate(Path(args.out), cfg)
    sizes = scenario_rows(cfg)
    log.info(f"wrote {sum(sizes.values())} rows ({', '.join(f'{m} {k}' for m, k in sizes.items())}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
