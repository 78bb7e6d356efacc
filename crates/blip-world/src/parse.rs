//! Reading a caption back into attributes and scoring it against a scene.

use serde::{Deserialize, Serialize};

use crate::scene::SceneAttributes;
use crate::vocab::{
    AttributeKind, Background, COUNT_WORDS, Colour, Position, Relation, Shape, Size, Texture,
};

/// How many mentions of one attribute kind were right and how many wrong.
///
/// ```
/// use blip_world::{Tally, caption_mentions, scene};
///
/// let s = scene(7, 0, 64);
/// let o = &s.objects()[0];
/// let m = caption_mentions(&s, &format!("a {} {}", o.size.name(), o.shape.name()));
/// assert_eq!(m.size, Tally { correct: 1, wrong: 0 });
/// assert_eq!((m.size.mentions(), m.relation.mentions()), (1, 0));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Mentions that agree with the scene.
    pub correct: u32,
    /// Mentions that contradict it.
    pub wrong: u32,
}

impl Tally {
    fn add(&mut self, ok: bool) {
        if ok {
            self.correct += 1;
        } else {
            self.wrong += 1;
        }
    }

    /// `correct + wrong`.
    pub fn mentions(self) -> u32 {
        self.correct + self.wrong
    }
}

/// What a caption says about a scene, attribute by attribute (see [`caption_mentions`]).
///
/// ```
/// use blip_world::{caption_mentions, scene};
///
/// let s = scene(7, 0, 64);
/// let m = caption_mentions(&s, &format!("a {}", s.objects()[0].shape.name()));
/// assert!(m.is_exact());
/// assert_eq!((m.objects_mentioned, m.correct(), m.wrong()), (1, 1, 0));
/// // Four objects cannot all be in a scene of at most three.
/// let m = caption_mentions(&s, "a red circle, a blue square, a green star and a yellow diamond");
/// assert!(m.objects_unmatched >= 1 && !m.is_exact());
/// assert!(!caption_mentions(&s, "a photo of a dog").mentions_anything());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttributeMatch {
    /// Shape nouns ("circle", "ball", ...): one per object mentioned.
    pub shape: Tally,
    /// Colour adjectives of objects.
    pub colour: Tally,
    /// Size adjectives.
    pub size: Tally,
    /// Position phrases ("on the left", "in the middle", ...).
    pub position: Tally,
    /// Relations between two mentioned objects ("above", "to the left of", ...).
    pub relation: Tally,
    /// A stated number of objects ("two shapes: ...", "only one shape").
    pub count: Tally,
    /// Background colour and texture words.
    pub background: Tally,
    /// Objects the caption mentions (noun phrases ending in a shape word).
    pub objects_mentioned: usize,
    /// Mentioned objects left without a scene object (more mentioned than drawn); all of
    /// their attributes count as wrong.
    pub objects_unmatched: usize,
}

impl AttributeMatch {
    /// The tally of one attribute kind.
    pub fn tally(&self, kind: AttributeKind) -> Tally {
        match kind {
            AttributeKind::Shape => self.shape,
            AttributeKind::Colour => self.colour,
            AttributeKind::Size => self.size,
            AttributeKind::Position => self.position,
            AttributeKind::Relation => self.relation,
        }
    }

    fn tallies(&self) -> [Tally; 7] {
        [
            self.shape,
            self.colour,
            self.size,
            self.position,
            self.relation,
            self.count,
            self.background,
        ]
    }

    /// Wrong mentions over all attributes.
    pub fn wrong(&self) -> u32 {
        self.tallies().iter().map(|t| t.wrong).sum()
    }

    /// Correct mentions over all attributes.
    pub fn correct(&self) -> u32 {
        self.tallies().iter().map(|t| t.correct).sum()
    }

    /// Whether the caption mentions any attribute of the world at all.
    pub fn mentions_anything(&self) -> bool {
        self.tallies().iter().any(|t| t.mentions() > 0)
    }

    /// "Exact attributes": at least one object mentioned and nothing wrong.
    pub fn is_exact(&self) -> bool {
        self.objects_mentioned > 0 && self.wrong() == 0
    }
}

/// Scores of many captions, each against its own scene: the share of mentioned colours and
/// shapes that are right, and how many captions have every attribute right.
///
/// ```
/// use blip_world::{CaptionScore, caption_mentions, scene};
///
/// let s = scene(7, 0, 64);
/// let o = &s.attributes().objects[0];
/// let right = format!("{} {}", o.colour.name(), o.shape.name());
/// let mut score = CaptionScore::default();
/// score.add(&caption_mentions(&s, &right));
/// score.add(&caption_mentions(&s, "unrelated words"));
/// assert_eq!((score.captions, score.exact), (2, 1));
/// assert_eq!(score.colour_right(), 1.0);
/// assert_eq!(score.exact_share(), score.exact as f64 / 2.0);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CaptionScore {
    /// Colour mentions, summed over the captions.
    pub colour: Tally,
    /// Shape mentions, summed over the captions.
    pub shape: Tally,
    /// Captions with every attribute right ([`AttributeMatch::is_exact`]).
    pub exact: usize,
    /// Captions scored.
    pub captions: usize,
}

impl CaptionScore {
    /// Adds one caption's match.
    pub fn add(&mut self, found: &AttributeMatch) {
        self.colour.correct += found.colour.correct;
        self.colour.wrong += found.colour.wrong;
        self.shape.correct += found.shape.correct;
        self.shape.wrong += found.shape.wrong;
        self.exact += usize::from(found.is_exact());
        self.captions += 1;
    }

    /// Right colour mentions over all colour mentions (0 when there are none).
    pub fn colour_right(&self) -> f64 {
        share(self.colour)
    }

    /// Right shape mentions over all shape mentions (0 when there are none).
    pub fn shape_right(&self) -> f64 {
        share(self.shape)
    }

    /// Captions with every attribute right over all captions (0 when there are none).
    pub fn exact_share(&self) -> f64 {
        self.exact as f64 / self.captions.max(1) as f64
    }
}

fn share(t: Tally) -> f64 {
    f64::from(t.correct) / f64::from(t.mentions().max(1))
}

#[derive(Clone, Debug, Default)]
struct ParsedObject {
    shape: Option<Shape>,
    colour: Option<Colour>,
    size: Option<Size>,
    position: Option<Position>,
}

#[derive(Debug, Default)]
struct Parsed {
    objects: Vec<ParsedObject>,
    relations: Vec<(usize, Relation, usize)>,
    count: Option<usize>,
    background: Option<Background>,
    texture: Option<Texture>,
}

fn lookup<T: Copy>(
    all: &[T],
    words: impl Fn(T) -> &'static [&'static str],
    word: &str,
) -> Option<T> {
    all.iter().copied().find(|v| words(*v).contains(&word))
}

/// Reads a caption with the world's grammar: noun phrases are adjectives (size, colour)
/// closed by a shape noun; a position phrase attaches to the noun phrase before it; a
/// relation links the noun phrases before and after it. Words outside the vocabulary are
/// ignored, so truncated and free-form texts parse as far as they go.
fn parse(caption: &str) -> Parsed {
    let lower = caption.to_lowercase();
    let tokens: Vec<&str> = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .collect();
    let mut parsed = Parsed::default();
    let mut pending = ParsedObject::default();
    let mut pending_relation: Option<(usize, Relation)> = None;
    let next_is = |i: usize, w: &str| tokens.get(i + 1) == Some(&w);
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i];
        let relation = match t {
            "left" if next_is(i, "of") => Some(Relation::LeftOf),
            "right" if next_is(i, "of") => Some(Relation::RightOf),
            "next" if next_is(i, "to") => Some(Relation::NextTo),
            "above" | "over" => Some(Relation::Above),
            "below" | "under" | "beneath" => Some(Relation::Below),
            "beside" => Some(Relation::NextTo),
            _ => None,
        };
        if let Some(relation) = relation {
            if let Some(subject) = parsed.objects.len().checked_sub(1) {
                pending_relation = Some((subject, relation));
            }
            if matches!(t, "left" | "right" | "next") {
                i += 1; // skip "of" / "to"
            }
        } else if let Some(position) = match t {
            "left" => Some(Position::Left),
            "right" => Some(Position::Right),
            "top" => Some(Position::Top),
            "bottom" => Some(Position::Bottom),
            "center" | "centre" | "middle" => Some(Position::Center),
            _ => None,
        } {
            if let Some(last) = parsed.objects.last_mut()
                && last.position.is_none()
            {
                last.position = Some(position);
            }
        } else if let Some(shape) = lookup(&Shape::ALL, Shape::words, t) {
            pending.shape = Some(shape);
            parsed.objects.push(std::mem::take(&mut pending));
            if let Some((subject, relation)) = pending_relation.take() {
                parsed
                    .relations
                    .push((subject, relation, parsed.objects.len() - 1));
            }
        } else if let Some(colour) = lookup(&Colour::ALL, Colour::words, t) {
            pending.colour.get_or_insert(colour);
        } else if let Some(size) = lookup(&Size::ALL, Size::words, t) {
            pending.size.get_or_insert(size);
        } else if let Some(bg) = lookup(&Background::ALL, Background::words, t) {
            parsed.background.get_or_insert(bg);
        } else if let Some(texture) = lookup(&Texture::ALL, Texture::words, t) {
            parsed.texture.get_or_insert(texture);
        } else if let Some(&(_, n)) = COUNT_WORDS.iter().find(|(w, _)| *w == t) {
            parsed.count.get_or_insert(n);
        }
        i += 1;
    }
    parsed
}

/// Scores the noun phrase `p` against scene object `o` (`None`: no object, all wrong).
fn score_object(m: &mut AttributeMatch, p: &ParsedObject, o: Option<&crate::ObjectAttributes>) {
    if let Some(shape) = p.shape {
        m.shape.add(o.is_some_and(|o| o.shape == shape));
    }
    if let Some(colour) = p.colour {
        m.colour.add(o.is_some_and(|o| o.colour == colour));
    }
    if let Some(size) = p.size {
        m.size.add(o.is_some_and(|o| o.size == size));
    }
    if let Some(position) = p.position {
        m.position.add(o.is_some_and(|o| o.position == position));
    }
}

/// Parses a caption written in the world's vocabulary and reports, attribute by attribute,
/// which mentions are right and which wrong for the scene.
///
/// Mentioned objects are matched one-to-one to scene objects in the way that leaves the
/// fewest wrong mentions (ties: the most correct ones), so "a red circle" in a scene with a
/// red circle somewhere is right wherever it is, while "a red circle on the left" needs it
/// on the left. Mentioned objects beyond the number drawn match nothing and are wrong in
/// every attribute they state; a relation is right if it holds between the two matched
/// objects. Stated counts and background words are checked directly.
///
/// This is the "captioning accuracy (exact attributes)" measure: see
/// [`AttributeMatch::is_exact`].
///
/// ```
/// use blip_world::{Colour, caption_mentions, scene};
///
/// let s = scene(7, 0, 64);
/// let o = &s.objects()[0];
/// let right = format!("a {} {} {}", o.colour.name(), o.shape.name(), o.position.phrases()[0]);
/// assert!(caption_mentions(&s, &right).is_exact());
/// // A colour no object has is wrong wherever the mention is matched.
/// let other = Colour::ALL.into_iter().find(|c| s.objects().iter().all(|o| o.colour != *c)).unwrap();
/// let wrong = caption_mentions(&s, &format!("a {} {}", other.name(), o.shape.name()));
/// assert_eq!((wrong.colour.wrong, wrong.shape.correct), (1, 1));
/// ```
pub fn caption_mentions(scene: impl AsRef<SceneAttributes>, caption: &str) -> AttributeMatch {
    let attrs = scene.as_ref();
    let parsed = parse(caption);
    let mut best: Option<AttributeMatch> = None;
    let mut assignment = Vec::with_capacity(parsed.objects.len());
    let mut used = vec![false; attrs.objects.len()];
    search(attrs, &parsed, &mut assignment, &mut used, &mut best);
    let mut m = best.unwrap_or_default();
    if let Some(count) = parsed.count {
        m.count.add(count == attrs.objects.len());
    }
    if let Some(bg) = parsed.background {
        m.background.add(bg == attrs.background);
    }
    if let Some(texture) = parsed.texture {
        m.background.add(texture == attrs.texture);
    }
    m
}

/// Depth-first search over one-to-one (partial) matchings of mentioned to scene objects.
fn search(
    attrs: &SceneAttributes,
    parsed: &Parsed,
    assignment: &mut Vec<Option<usize>>,
    used: &mut [bool],
    best: &mut Option<AttributeMatch>,
) {
    let k = assignment.len();
    if k == parsed.objects.len() {
        let mut m = AttributeMatch {
            objects_mentioned: k,
            ..AttributeMatch::default()
        };
        for (p, a) in parsed.objects.iter().zip(assignment.iter()) {
            score_object(&mut m, p, a.map(|j| &attrs.objects[j]));
            if a.is_none() {
                m.objects_unmatched += 1;
            }
        }
        for &(s, r, o) in &parsed.relations {
            let holds = match (assignment[s], assignment[o]) {
                (Some(s), Some(o)) => attrs.relation_holds(s, r, o),
                _ => false,
            };
            m.relation.add(holds);
        }
        let better = match best {
            None => true,
            Some(b) => {
                (m.wrong(), std::cmp::Reverse(m.correct()))
                    < (b.wrong(), std::cmp::Reverse(b.correct()))
            }
        };
        if better {
            *best = Some(m);
        }
        return;
    }
    // Leaving a mention unmatched is only allowed once every scene object is taken.
    let free: Vec<usize> = (0..used.len()).filter(|&j| !used[j]).collect();
    if free.is_empty() {
        assignment.push(None);
        search(attrs, parsed, assignment, used, best);
        assignment.pop();
        return;
    }
    for j in free {
        used[j] = true;
        assignment.push(Some(j));
        search(attrs, parsed, assignment, used, best);
        assignment.pop();
        used[j] = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scene::{ObjectAttributes, RelationFact};

    fn object(shape: Shape, colour: Colour, size: Size, position: Position) -> ObjectAttributes {
        ObjectAttributes {
            shape,
            colour,
            size,
            position,
            center: [0.5, 0.5],
            radius: 0.1,
            bbox: [0, 0, 1, 1],
            rgb: colour.rgb(),
        }
    }

    fn two_objects() -> SceneAttributes {
        SceneAttributes {
            image_size: 64,
            background: Background::White,
            texture: Texture::Plain,
            objects: vec![
                object(Shape::Circle, Colour::Red, Size::Large, Position::Left),
                object(Shape::Square, Colour::Blue, Size::Small, Position::Right),
            ],
            relations: vec![
                RelationFact {
                    subject: 0,
                    object: 1,
                    relations: vec![Relation::LeftOf],
                },
                RelationFact {
                    subject: 1,
                    object: 0,
                    relations: vec![Relation::RightOf],
                },
            ],
        }
    }

    #[test]
    fn reads_the_grammar() {
        let s = two_objects();
        let m = caption_mentions(&s, "a red circle to the left of a small blue square");
        assert_eq!(
            (
                m.shape.correct,
                m.colour.correct,
                m.size.correct,
                m.relation.correct
            ),
            (2, 2, 1, 1)
        );
        assert!(m.is_exact());
        let m = caption_mentions(&s, "there is a big crimson ball on the left");
        assert!(m.is_exact() && m.position.correct == 1 && m.size.correct == 1);
        let m = caption_mentions(
            &s,
            "two shapes: a blue box on the right and a red disc on a plain white background",
        );
        assert!(m.is_exact(), "{m:?}");
        assert_eq!(
            (m.count.correct, m.background.correct, m.position.correct),
            (1, 2, 1)
        );
    }

    #[test]
    fn finds_the_wrong_attribute() {
        let s = two_objects();
        let m = caption_mentions(&s, "a red circle to the right of a small blue square");
        assert_eq!((m.wrong(), m.relation.wrong), (1, 1));
        let m = caption_mentions(&s, "a green circle on the left");
        assert_eq!((m.wrong(), m.colour.wrong), (1, 1));
        let m = caption_mentions(&s, "a small red circle");
        assert_eq!((m.wrong(), m.size.wrong), (1, 1));
        let m = caption_mentions(&s, "a blue square in the middle");
        assert_eq!((m.wrong(), m.position.wrong), (1, 1));
        let m = caption_mentions(&s, "a red star on the left");
        assert_eq!((m.wrong(), m.shape.wrong), (1, 1));
        let m = caption_mentions(&s, "three shapes: a red circle, a blue square and a star");
        assert_eq!(
            (m.count.wrong, m.shape.wrong, m.objects_unmatched),
            (1, 1, 1)
        );
        let m = caption_mentions(&s, "cheap flights to rome");
        assert!(!m.mentions_anything() && !m.is_exact());
        // Truncated mid-phrase: the dangling adjectives and relation are dropped.
        let m = caption_mentions(&s, "a red circle to the left of a small bl");
        assert!(m.is_exact() && m.relation.mentions() == 0);
    }
}
