//! Caption plans (structured captions), their rendering, and the noisy web-text variants.

use crate::parse::caption_mentions;
use crate::scene::SceneAttributes;
use crate::vocab::{
    AttributeKind, Background, Colour, Position, Relation, Shape, Size, Texture, count_word,
};
use blip_core::SplitMix64;

/// A value and the index of the synonym that names it.
type Worded<T> = (T, usize);

/// "a [size] [colour] shape [position]".
#[derive(Clone, Debug, PartialEq)]
struct NounPhrase {
    shape: Worded<Shape>,
    colour: Option<Worded<Colour>>,
    size: Option<Worded<Size>>,
    position: Option<Worded<Position>>,
}

#[derive(Clone, Debug, PartialEq)]
enum Body {
    /// One object.
    Single(NounPhrase),
    /// "A relation B": object indices and their phrases.
    Relation {
        subject: usize,
        a: NounPhrase,
        relation: Worded<Relation>,
        object: usize,
        b: NounPhrase,
    },
    /// Every object, in some order.
    List(Vec<NounPhrase>),
}

/// A structured caption: rendering it gives the text, and swapping one value in it gives a
/// caption that is wrong in exactly that attribute.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Plan {
    /// A stated number of objects ("two shapes: ...").
    count: Option<(usize, usize)>,
    body: Body,
    /// " on a [texture] background-colour background".
    background: Option<(Worded<Background>, Option<Worded<Texture>>)>,
}

const COUNT_NOUNS: [&str; 2] = ["shapes", "objects"];

fn worded<T: Copy>(value: T, words: &[&str], rng: &mut SplitMix64) -> Worded<T> {
    (value, rng.below(words.len()))
}

fn noun_phrase(
    attrs: &SceneAttributes,
    i: usize,
    rng: &mut SplitMix64,
    position: bool,
) -> NounPhrase {
    let o = &attrs.objects[i];
    NounPhrase {
        shape: worded(o.shape, o.shape.words(), rng),
        colour: rng
            .chance(0.85)
            .then(|| worded(o.colour, o.colour.words(), rng)),
        size: rng.chance(0.5).then(|| worded(o.size, o.size.words(), rng)),
        position: (position && rng.chance(0.5))
            .then(|| worded(o.position, o.position.phrases(), rng)),
    }
}

fn background(
    attrs: &SceneAttributes,
    rng: &mut SplitMix64,
    p: f64,
) -> Option<(Worded<Background>, Option<Worded<Texture>>)> {
    rng.chance(p).then(|| {
        let bg = worded(attrs.background, attrs.background.words(), rng);
        let texture = rng
            .chance(0.5)
            .then(|| worded(attrs.texture, attrs.texture.words(), rng));
        (bg, texture)
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyKind {
    Single,
    Relation,
    List,
}

/// A random correct caption plan of the scene.
pub(crate) fn random_plan(attrs: &SceneAttributes, rng: &mut SplitMix64) -> Plan {
    let kind = if attrs.objects.len() == 1 {
        BodyKind::Single
    } else {
        [BodyKind::Single, BodyKind::Relation, BodyKind::List][rng.weighted(&[0.35, 0.4, 0.25])]
    };
    plan_of_kind(attrs, rng, kind)
}

fn plan_of_kind(attrs: &SceneAttributes, rng: &mut SplitMix64, kind: BodyKind) -> Plan {
    let n = attrs.objects.len();
    let count_of = |rng: &mut SplitMix64| (n, rng.below(COUNT_NOUNS.len()));
    match kind {
        BodyKind::Single => {
            let i = rng.below(n);
            let np = noun_phrase(attrs, i, rng, true);
            let count = (n == 1 && rng.chance(0.15)).then(|| count_of(rng));
            Plan {
                count,
                body: Body::Single(np),
                background: background(attrs, rng, 0.2),
            }
        }
        BodyKind::Relation => {
            assert!(n >= 2, "a relation needs two objects");
            let subject = rng.below(n);
            let object = (subject + 1 + rng.below(n - 1)) % n;
            let (ps, po) = (
                attrs.objects[subject].position,
                attrs.objects[object].position,
            );
            let holds: Vec<Relation> = Relation::ALL
                .into_iter()
                .filter(|r| r.holds(ps, po))
                .collect();
            let relation = *rng.pick(&holds);
            let a = noun_phrase(attrs, subject, rng, false);
            let b = noun_phrase(attrs, object, rng, false);
            Plan {
                count: rng.chance(0.3).then(|| count_of(rng)),
                body: Body::Relation {
                    subject,
                    a,
                    relation: worded(relation, relation.phrases(), rng),
                    object,
                    b,
                },
                background: None,
            }
        }
        BodyKind::List => {
            let mut order: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut order);
            let nps = order
                .iter()
                .map(|&i| noun_phrase(attrs, i, rng, true))
                .collect();
            Plan {
                count: rng.chance(0.5).then(|| count_of(rng)),
                body: Body::List(nps),
                background: background(attrs, rng, 0.2),
            }
        }
    }
}

/// "a" or "an" before `word`.
fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn push_with_article(out: &mut String, words: &[&str]) {
    out.push_str(article(words[0]));
    for w in words {
        out.push(' ');
        out.push_str(w);
    }
}

impl NounPhrase {
    fn render(&self, out: &mut String) {
        let mut words = Vec::with_capacity(3);
        if let Some((size, k)) = self.size {
            words.push(size.words()[k]);
        }
        if let Some((colour, k)) = self.colour {
            words.push(colour.words()[k]);
        }
        words.push(self.shape.0.words()[self.shape.1]);
        push_with_article(out, &words);
        if let Some((position, k)) = self.position {
            out.push(' ');
            out.push_str(position.phrases()[k]);
        }
    }
}

impl NounPhrase {
    fn canonical(&mut self) {
        self.shape.1 = 0;
        if let Some(colour) = &mut self.colour {
            colour.1 = 0;
        }
        if let Some(size) = &mut self.size {
            size.1 = 0;
        }
        if let Some(position) = &mut self.position {
            position.1 = 0;
        }
    }
}

impl Plan {
    /// The caption text, with the drawn synonyms or, when `synonyms` is false, every
    /// value's canonical word (the first of its list).
    pub(crate) fn render_worded(&self, synonyms: bool) -> String {
        if synonyms {
            return self.render();
        }
        let mut plan = self.clone();
        if let Some((_, noun)) = plan.count.as_mut() {
            *noun = 0;
        }
        match &mut plan.body {
            Body::Single(np) => np.canonical(),
            Body::Relation { a, relation, b, .. } => {
                a.canonical();
                relation.1 = 0;
                b.canonical();
            }
            Body::List(nps) => nps.iter_mut().for_each(NounPhrase::canonical),
        }
        if let Some(((_, k), texture)) = plan.background.as_mut() {
            *k = 0;
            if let Some((_, j)) = texture.as_mut() {
                *j = 0;
            }
        }
        plan.render()
    }

    /// The caption text.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        match self.count {
            Some((1, _)) => out.push_str("only one shape: "),
            Some((n, noun)) => {
                out.push_str(count_word(n));
                out.push(' ');
                out.push_str(COUNT_NOUNS[noun]);
                out.push_str(": ");
            }
            // No "a photo of "-like opening: BLIP's captioner puts its prompt ("a picture of ")
            // in front of every caption, and a caption that opened with a paraphrase of it
            // would teach the captioner to say it twice.
            None => {}
        }
        match &self.body {
            Body::Single(np) => np.render(&mut out),
            Body::Relation { a, relation, b, .. } => {
                a.render(&mut out);
                out.push(' ');
                out.push_str(relation.0.phrases()[relation.1]);
                out.push(' ');
                b.render(&mut out);
            }
            Body::List(nps) => {
                for (k, np) in nps.iter().enumerate() {
                    if k > 0 {
                        out.push_str(if k + 1 == nps.len() { " and " } else { ", " });
                    }
                    np.render(&mut out);
                }
            }
        }
        if let Some(((bg, k), texture)) = self.background {
            let mut words = Vec::with_capacity(3);
            if let Some((t, j)) = texture {
                words.push(t.words()[j]);
            }
            words.push(bg.words()[k]);
            words.push("background");
            out.push_str(" on ");
            push_with_article(&mut out, &words);
        }
        out
    }

    fn noun_phrases_mut(&mut self) -> Vec<&mut NounPhrase> {
        match &mut self.body {
            Body::Single(np) => vec![np],
            Body::Relation { a, b, .. } => vec![a, b],
            Body::List(nps) => nps.iter_mut().collect(),
        }
    }

    /// Replaces one mentioned value of `kind` with a different one; `false` if the plan
    /// mentions no attribute of that kind.
    fn swap(&mut self, attrs: &SceneAttributes, kind: AttributeKind, rng: &mut SplitMix64) -> bool {
        fn other<T: Copy + PartialEq>(all: &[T], current: T, rng: &mut SplitMix64) -> T {
            let others: Vec<T> = all.iter().copied().filter(|v| *v != current).collect();
            *rng.pick(&others)
        }
        fn reword<T: Copy>(value: T, words: &[&str], rng: &mut SplitMix64) -> Worded<T> {
            (value, rng.below(words.len()))
        }
        if kind == AttributeKind::Relation {
            let Body::Relation {
                subject,
                relation,
                object,
                ..
            } = &mut self.body
            else {
                return false;
            };
            let (ps, po) = (
                attrs.objects[*subject].position,
                attrs.objects[*object].position,
            );
            let false_ones: Vec<Relation> = Relation::ALL
                .into_iter()
                .filter(|r| !r.holds(ps, po))
                .collect();
            let r = *rng.pick(&false_ones);
            *relation = reword(r, r.phrases(), rng);
            return true;
        }
        let mut nps = self.noun_phrases_mut();
        nps.retain(|np| match kind {
            AttributeKind::Shape => true,
            AttributeKind::Colour => np.colour.is_some(),
            AttributeKind::Size => np.size.is_some(),
            AttributeKind::Position => np.position.is_some(),
            AttributeKind::Relation => false,
        });
        if nps.is_empty() {
            return false;
        }
        let k = rng.below(nps.len());
        let np = &mut nps[k];
        match kind {
            AttributeKind::Shape => {
                let s = other(&Shape::ALL, np.shape.0, rng);
                np.shape = reword(s, s.words(), rng);
            }
            AttributeKind::Colour => {
                let c = other(&Colour::ALL, np.colour.expect("retained").0, rng);
                np.colour = Some(reword(c, c.words(), rng));
            }
            AttributeKind::Size => {
                let s = other(&Size::ALL, np.size.expect("retained").0, rng);
                np.size = Some(reword(s, s.words(), rng));
            }
            AttributeKind::Position => {
                let p = other(&Position::ALL, np.position.expect("retained").0, rng);
                np.position = Some(reword(p, p.phrases(), rng));
            }
            AttributeKind::Relation => unreachable!(),
        }
        true
    }
}

/// A caption of the scene that is wrong in exactly one attribute, and that attribute:
/// a correct plan with one value swapped, kept only if [`caption_mentions`] finds exactly
/// one wrong attribute, of the swapped kind. `None` if 64 tries fail (not seen in practice).
pub(crate) fn wrong_attribute(
    attrs: &SceneAttributes,
    rng: &mut SplitMix64,
    synonyms: bool,
) -> Option<(String, AttributeKind)> {
    let kinds: Vec<AttributeKind> = AttributeKind::ALL
        .into_iter()
        .filter(|k| *k != AttributeKind::Relation || attrs.objects.len() >= 2)
        .collect();
    // The kind is drawn first and kept for several plans, so that kinds a plan mentions
    // less often (positions) are not under-represented.
    for _ in 0..8 {
        let kind = *rng.pick(&kinds);
        for _ in 0..8 {
            let mut plan = if kind == AttributeKind::Relation {
                plan_of_kind(attrs, rng, BodyKind::Relation)
            } else {
                random_plan(attrs, rng)
            };
            if !plan.swap(attrs, kind, rng) {
                continue;
            }
            let text = plan.render_worded(synonyms);
            let m = caption_mentions(attrs, &text);
            if m.wrong() == 1 && m.tally(kind).wrong == 1 {
                return Some((text, kind));
            }
        }
    }
    None
}

/// The caption cut short, as alt texts cut at a length limit are: at 30–70 % of its
/// length, half the time at a word boundary, half the time mid-word. A cut that happens to
/// leave a complete caption (ending on a shape noun, a position phrase or "background")
/// is redrawn, so that a truncated text always visibly lacks its end. Strictly shorter and
/// never empty (for texts of two characters or more).
pub(crate) fn truncate(text: &str, rng: &mut SplitMix64) -> String {
    let text = text.trim();
    let len = text.len();
    let mut out = String::new();
    for _ in 0..16 {
        let mut cut = ((len as f64) * rng.range_f64(0.3, 0.7)) as usize;
        while cut > 0 && !text.is_char_boundary(cut) {
            cut -= 1;
        }
        if rng.chance(0.5)
            && let Some(space) = text[..cut].rfind(' ')
        {
            cut = space;
        }
        out = text[..cut].trim_end().to_string();
        if out.is_empty() {
            // Only for texts of a few characters.
            let keep = text.chars().count().saturating_sub(1).max(1);
            return text.chars().take(keep).collect();
        }
        if !looks_complete(text, out.len()) {
            break;
        }
    }
    out
}

/// Whether `text[..cut]` ends at a word boundary on a word that can end a caption.
pub(crate) fn looks_complete(text: &str, cut: usize) -> bool {
    let at_boundary = text[cut..]
        .chars()
        .next()
        .is_none_or(|c| !c.is_alphanumeric());
    let last = text[..cut]
        .rsplit(|c: char| !c.is_alphanumeric())
        .find(|w| !w.is_empty())
        .unwrap_or("");
    let ends_phrase = Shape::ALL.iter().any(|s| s.words().contains(&last))
        || [
            "left",
            "right",
            "side",
            "top",
            "bottom",
            "center",
            "centre",
            "middle",
            "background",
        ]
        .contains(&last);
    at_boundary && ends_phrase
}

const HOW: [&str; 6] = [
    "click here to",
    "learn how to",
    "the best way to",
    "ten easy ways to",
    "find out how to",
    "why you should never",
];
const DO: [&str; 7] = ["cook", "clean", "repair", "sell", "paint", "plan", "book"];
const THING: [&str; 9] = [
    "pasta for dinner",
    "cheap flights to rome",
    "your kitchen sink",
    "a used car",
    "a summer wedding",
    "the garden fence",
    "an old bicycle",
    "your home office",
    "the perfect holiday",
];
const WHO: [&str; 6] = [
    "my dog",
    "our team",
    "the local band",
    "grandma",
    "a famous chef",
    "the mayor",
];
const DID: [&str; 6] = ["visited", "cooked", "won", "played", "loved", "reviewed"];
const WHAT: [&str; 6] = [
    "the city museum",
    "a chocolate cake",
    "the football match",
    "a new song",
    "the beach house",
    "the final exam",
];
const WHEN: [&str; 6] = [
    "last weekend",
    "yesterday",
    "this summer",
    "on monday",
    "at night",
    "after lunch",
];
const PRODUCT: [&str; 6] = [
    "wireless headphones",
    "leather boots",
    "garden chairs",
    "coffee beans",
    "running shoes",
    "a phone case",
];
const DEAL: [&str; 5] = [
    "free shipping",
    "now on sale",
    "save 20 percent",
    "limited offer",
    "best price online",
];

/// A random sentence about another topic, using no word of the world's vocabulary.
pub(crate) fn unrelated(rng: &mut SplitMix64) -> String {
    match rng.below(3) {
        0 => format!("{} {} {}", rng.pick(&HOW), rng.pick(&DO), rng.pick(&THING)),
        1 => format!(
            "{} {} {} {}",
            rng.pick(&WHO),
            rng.pick(&DID),
            rng.pick(&WHAT),
            rng.pick(&WHEN)
        ),
        _ => format!("{} - {}", rng.pick(&PRODUCT), rng.pick(&DEAL)),
    }
}

/// A scene's correct captions live with the templates that write them.
impl crate::scene::Scene {
    /// Correct captions of this scene, each different, drawn with `rng` from varied
    /// templates and synonyms (five of them; see [`Self::captions_n`]).
    pub fn captions(&self, rng: &mut SplitMix64) -> Vec<String> {
        self.captions_n(rng, 5)
    }

    /// Up to `n` distinct correct captions (fewer only if the templates run dry, which
    /// does not happen for `n <= 20`).
    pub fn captions_n(&self, rng: &mut SplitMix64, n: usize) -> Vec<String> {
        self.captions_worded(rng, n, true)
    }

    /// Up to `n` distinct correct captions, with synonyms or, when `synonyms` is false,
    /// each value's canonical word only (fewer distinct captions then, for small scenes).
    ///
    /// ```
    /// use blip_world::{SplitMix64, scene};
    ///
    /// let s = scene(7, 0, 64);
    /// for caption in s.captions_worded(&mut SplitMix64::new(1), 20, false) {
    ///     for synonym in ["ball", "disc", "box", "block", "rhombus", "crimson", "big", "tiny"] {
    ///         assert!(!caption.split(' ').any(|w| w == synonym), "{caption}");
    ///     }
    /// }
    /// ```
    pub fn captions_worded(&self, rng: &mut SplitMix64, n: usize, synonyms: bool) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(n);
        let mut tries = 0;
        while out.len() < n && tries < 50 * n.max(1) {
            tries += 1;
            let caption = random_plan(self.attributes(), rng).render_worded(synonyms);
            if !out.contains(&caption) {
                out.push(caption);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scene::scene;

    #[test]
    fn captions_are_correct_and_varied() {
        let mut all = std::collections::BTreeSet::new();
        for index in 0..300 {
            let s = scene(3, index, 64);
            let mut rng = crate::stream(3, &[99, index]);
            let captions = s.captions(&mut rng);
            assert_eq!(captions.len(), 5, "{captions:?}");
            for c in &captions {
                let m = caption_mentions(&s, c);
                assert!(m.is_exact(), "{c:?} on {:?}: {m:?}", s.attributes());
                assert!(m.shape.correct >= 1);
                all.insert(c.clone());
            }
        }
        assert!(all.len() > 1000, "only {} distinct captions", all.len());
    }

    #[test]
    fn wrong_attribute_swaps_exactly_one() {
        let mut kinds = std::collections::BTreeMap::new();
        for index in 0..300 {
            let s = scene(4, index, 64);
            let mut rng = crate::stream(4, &[7, index]);
            let (text, kind) = wrong_attribute(s.attributes(), &mut rng, true).expect("a swap");
            let m = caption_mentions(&s, &text);
            assert_eq!(m.wrong(), 1, "{text:?}");
            assert_eq!(m.tally(kind).wrong, 1, "{text:?}");
            *kinds.entry(kind).or_insert(0) += 1;
        }
        assert_eq!(kinds.len(), 5, "{kinds:?}");
    }

    #[test]
    fn no_caption_opens_like_a_captioning_prompt() {
        // BLIP's prompt and the openings that paraphrase it (and used to be templates here).
        let openings = [
            "a picture",
            "a photo",
            "an image",
            "a drawing",
            "there is",
            "a simple picture",
        ];
        let mut rng = SplitMix64::new(11);
        for index in 0..200 {
            for caption in scene(11, index, 64).captions_n(&mut rng, 20) {
                assert!(
                    openings.iter().all(|o| !caption.starts_with(o)),
                    "{caption:?}"
                );
            }
        }
    }

    #[test]
    fn truncation_and_unrelated_text() {
        let mut rng = SplitMix64::new(1);
        for _ in 0..500 {
            let text = "a photo of a large red circle on the left";
            let t = truncate(text, &mut rng);
            assert!(
                !t.is_empty() && t.len() < text.len() && text.starts_with(&t),
                "{t:?}"
            );
            assert!(!looks_complete(text, t.len()), "{t:?}");
            let u = unrelated(&mut rng);
            let s = scene(1, 0, 64);
            let m = caption_mentions(&s, &u);
            assert!(!m.mentions_anything(), "{u:?}: {m:?}");
        }
    }
}
