"""Print a page's structure for annotating bench/extract_annotations.json by reading the page: every
text-bearing block with its tag, the class/id of its nearest landmark ancestors and its text (cut).

This is how the annotations were made (reading the page's own markup, not any extractor's output):
    python bench/extract_outline.py ../shared/data/web_html/blog.python.org.html
    python bench/extract_outline.py --min=40 PAGE.html ...     # only blocks of >= 40 characters
"""

from __future__ import annotations

import argparse
from pathlib import Path

from resiliparse.parse.encoding import bytes_to_str, detect_encoding
from resiliparse.parse.html import HTMLTree, NodeType

BLOCKS = {"p", "div", "li", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "dt", "dd",
          "figcaption", "caption", "span", "a", "section", "article", "header", "footer", "nav", "aside", "time"}
LEAF_BLOCKS = {"p", "li", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "dt", "dd", "figcaption",
               "caption"}
INLINE = {"a", "span", "time"}
SKIP = {"script", "style", "noscript", "svg", "template", "iframe"}


def own_text(node) -> str:
    return " ".join(" ".join(c.text for c in node.child_nodes if c.type == NodeType.TEXT).split())


def landmark(node) -> str:
    bits = []
    while node is not None and node.type == NodeType.ELEMENT and node.tag not in ("body", "html"):
        label = node.tag
        if node.id:
            label += "#" + node.id[:20]
        if node.class_name:
            label += "." + ".".join(node.class_name.split())[:30]
        if label != node.tag or node.tag in ("article", "main", "nav", "aside", "footer", "header", "section"):
            bits.append(label)
        node = node.parent
    return " < ".join(bits[:3])


def outline(path: Path, width: int = 110, min_chars: int = 15) -> None:
    raw = path.read_bytes()
    tree = HTMLTree.parse(bytes_to_str(raw, detect_encoding(raw)))
    print("TITLE:", tree.title)
    stack = [tree.body] if tree.body else []
    while stack:
        node = stack.pop()
        if node.type != NodeType.ELEMENT or node.tag in SKIP:
            continue
        text = own_text(node)
        if node.tag in LEAF_BLOCKS and not any(c.type == NodeType.ELEMENT and c.tag in BLOCKS - INLINE
                                               for c in node.child_nodes):
            text = " ".join(node.text.split())  # whole text of a paragraph-like block, links included
        if node.tag in BLOCKS and (len(text) >= min_chars or node.tag in ("h1", "h2") and len(text) >= 15):
            print(f"[{node.tag}] {{{landmark(node)[:80]}}} {text[:width]}")
        stack.extend(reversed(list(node.child_nodes)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pages", nargs="+", type=Path, help="HTML files")
    ap.add_argument("--min", type=int, default=15, help="shortest block text printed (characters)")
    args = ap.parse_args(argv)
    for page in args.pages:
        print("=" * 20, page)
        outline(page, min_chars=args.min)


if __name__ == "__main__":
    main()
