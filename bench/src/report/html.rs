//! The report's page: one self-contained HTML file, its plots inline SVG, its style inline
//! CSS, no script and no reference to anything outside it.

use std::fmt::Write;

/// A table of figures.
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub caption: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// The table's CSS class (empty: none).
    pub class: String,
    /// Each row's CSS class (empty: none), beside `rows`.
    pub row_classes: Vec<String>,
}

impl Table {
    pub fn new(caption: &str, header: &[&str]) -> Table {
        Table {
            caption: caption.to_string(),
            header: header.iter().map(|h| h.to_string()).collect(),
            ..Table::default()
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.row_with_class(cells, "");
    }

    /// A row drawn with the CSS class `class`.
    pub fn row_with_class(&mut self, cells: Vec<String>, class: &str) {
        self.rows.push(cells);
        self.row_classes.push(class.to_string());
    }
}

/// One part of the report: a heading, what was run, a plot (or why there is none), the
/// tables of its figures and a note on reading them.
#[derive(Clone, Debug, Default)]
pub struct Section {
    pub id: String,
    pub heading: String,
    /// Plain text.
    pub intro: String,
    /// An SVG document, or why the plot is missing.
    pub plot: Option<Result<String, String>>,
    pub tables: Vec<Table>,
    /// Plain text.
    pub note: String,
}

/// The whole page.
#[derive(Clone, Debug, Default)]
pub struct Page {
    pub title: String,
    /// A `--quick` run (a subset of the suite).
    pub quick: bool,
    /// What the run was, in a sentence (plain text).
    pub scope: String,
    pub command: String,
    /// (what, value) of the machine and the run.
    pub machine: Vec<(String, String)>,
    pub sections: Vec<Section>,
}

/// Text made safe for HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An SVG document made ready to sit inside HTML: the XML namespace (a URL, and not
/// needed inline) left out, sized by the page.
pub fn inline_svg(svg: &str) -> String {
    svg.replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1)
        .replacen("<svg ", "<svg class=\"plot\" role=\"img\" ", 1)
}

const STYLE: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:940px;margin:2em auto;\
padding:0 1em;color:#1b1b1b;line-height:1.45}\
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd;\
padding-bottom:.2em}\
.banner{padding:.6em 1em;border-radius:4px;margin:1em 0}\
.quick{background:#fff4d6;border:1px solid #e6c15a}.full{background:#e6f4ea;border:1px solid #8cc79c}\
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}\
caption{text-align:left;font-weight:600;padding:.3em 0}\
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}\
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}\
svg.plot{max-width:100%;height:auto;display:block;margin:1em 0}\
code{background:#f3f3f3;padding:.1em .3em;border-radius:3px}\
.note{color:#444;font-size:.92em}.error{color:#a00;font-weight:600}\
nav a{margin-right:1em}.machine td{text-align:left}\
table.targets td{text-align:left;vertical-align:top}table.targets th{text-align:left}\
tr.met td:last-child{background:#d7f0de;color:#14532d;font-weight:600}\
tr.missed td:last-child{background:#fbdada;color:#8b0000;font-weight:600}\
tr.notrun td:last-child{background:#eee;color:#555;font-style:italic}\
.tally{font-weight:600}";

/// The page as HTML.
pub fn render(page: &Page) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
        escape(&page.title),
        escape(&page.title)
    );
    let (class, what) = if page.quick {
        (
            "quick",
            "A quick run (<code>--quick</code>): a subset of the suite, fewer and shorter runs.",
        )
    } else {
        ("full", "A full run of the suite.")
    };
    let _ = writeln!(
        h,
        "<p class=\"banner {class}\">{what} {}</p>",
        escape(&page.scope)
    );
    h.push_str("<nav>");
    for s in &page.sections {
        let _ = write!(
            h,
            "<a href=\"#{}\">{}</a>",
            escape(&s.id),
            escape(&s.heading)
        );
    }
    h.push_str("<a href=\"#machine\">Machine and command</a></nav>\n");
    for s in &page.sections {
        let _ = writeln!(
            h,
            "<section id=\"{}\">\n<h2>{}</h2>\n<p>{}</p>",
            escape(&s.id),
            escape(&s.heading),
            escape(&s.intro)
        );
        match &s.plot {
            Some(Ok(svg)) => {
                h.push_str(&inline_svg(svg));
                h.push('\n');
            }
            Some(Err(e)) => {
                let _ = writeln!(h, "<p class=\"error\">No plot: {}</p>", escape(e));
            }
            None => {}
        }
        for t in &s.tables {
            table(&mut h, t);
        }
        if !s.note.is_empty() {
            let _ = writeln!(h, "<p class=\"note\">{}</p>", escape(&s.note));
        }
        h.push_str("</section>\n");
    }
    h.push_str("<section id=\"machine\">\n<h2>Machine and command</h2>\n");
    h.push_str("<div class=\"machine\">");
    let mut m = Table::new("", &[]);
    for (k, v) in &page.machine {
        m.row(vec![k.clone(), v.clone()]);
    }
    table(&mut h, &m);
    h.push_str("</div>");
    let _ = writeln!(
        h,
        "<p>Command:</p>\n<pre><code>{}</code></pre>\n</section>\n</body>\n</html>",
        escape(&page.command)
    );
    h
}

fn table(h: &mut String, t: &Table) {
    if t.class.is_empty() {
        h.push_str("<table>");
    } else {
        let _ = write!(h, "<table class=\"{}\">", escape(&t.class));
    }
    if !t.caption.is_empty() {
        let _ = write!(h, "<caption>{}</caption>", escape(&t.caption));
    }
    if !t.header.is_empty() {
        h.push_str("<thead><tr>");
        for c in &t.header {
            let _ = write!(h, "<th>{}</th>", escape(c));
        }
        h.push_str("</tr></thead>");
    }
    h.push_str("<tbody>");
    for (i, r) in t.rows.iter().enumerate() {
        match t.row_classes.get(i).filter(|c| !c.is_empty()) {
            Some(c) => {
                let _ = write!(h, "<tr class=\"{}\">", escape(c));
            }
            None => h.push_str("<tr>"),
        }
        for c in r {
            let _ = write!(h, "<td>{}</td>", escape(c));
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_text() {
        assert_eq!(escape("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&#39;");
        assert_eq!(escape("kill → first reply"), "kill → first reply");
    }

    #[test]
    fn inline_svg_has_no_namespace_url() {
        let svg = "<svg width=\"10\" height=\"10\" viewBox=\"0 0 10 10\" \
                   xmlns=\"http://www.w3.org/2000/svg\">\n</svg>";
        let s = inline_svg(svg);
        assert!(!s.contains("http"));
        assert!(s.starts_with("<svg class=\"plot\" role=\"img\" width=\"10\""));
    }

    #[test]
    fn table_and_row_classes() {
        let mut t = Table::new("targets", &["what", "verdict"]);
        t.class = "targets".into();
        t.row_with_class(vec!["pause".into(), "met".into()], "met");
        t.row(vec!["plain".into(), "-".into()]);
        t.row_with_class(vec!["sync".into(), "missed".into()], "missed");
        let mut h = String::new();
        table(&mut h, &t);
        assert!(h.starts_with("<table class=\"targets\"><caption>targets</caption>"));
        assert!(h.contains("<tr class=\"met\"><td>pause</td><td>met</td></tr>"));
        assert!(h.contains("<tr><td>plain</td>"));
        assert!(h.contains("<tr class=\"missed\"><td>sync</td>"));
        let mut plain = String::new();
        table(&mut plain, &Table::new("", &["a"]));
        assert!(plain.starts_with("<table><thead>"));
    }

    #[test]
    fn page_structure() {
        let mut t = Table::new("figures <1>", &["rate", "p50"]);
        t.row(vec!["100".into(), "0.2".into()]);
        let page = Page {
            title: "lockstep report".into(),
            quick: true,
            scope: "3 dirty rates".into(),
            command: "cargo run --release -p bench -- report --quick --out /tmp/x".into(),
            machine: vec![("nproc".into(), "2".into())],
            sections: vec![
                Section {
                    id: "a".into(),
                    heading: "Pauses".into(),
                    intro: "why & how".into(),
                    plot: Some(Ok("<svg xmlns=\"http://www.w3.org/2000/svg\"></svg>".into())),
                    tables: vec![t],
                    note: "read it so".into(),
                },
                Section {
                    id: "b".into(),
                    heading: "Failover".into(),
                    plot: Some(Err("the run failed".into())),
                    ..Section::default()
                },
            ],
        };
        let h = render(&page);
        assert!(h.starts_with("<!DOCTYPE html>"));
        assert!(h.contains("--quick"));
        assert!(h.contains("figures &lt;1&gt;"));
        assert!(h.contains("why &amp; how"));
        assert!(h.contains("No plot: the run failed"));
        assert!(h.contains("<div class=\"machine\"><table><tbody><tr><td>nproc</td><td>2</td>"));
        assert_eq!(h.matches("<svg").count(), 1);
        assert!(!h.contains("http") && !h.contains("<script") && !h.contains("src="));
        let full = render(&Page {
            quick: false,
            ..page
        });
        assert!(full.contains("A full run"));
    }
}
