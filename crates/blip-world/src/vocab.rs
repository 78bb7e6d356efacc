//! The world's attribute values and the words that name them.
//!
//! The vocabulary is deliberately small (about sixty words in all) so that a tiny model can
//! learn it, with a few synonyms per value so that captions still vary. The first word of
//! each list is the canonical name, used in the JSON files.

use serde::{Deserialize, Serialize};

/// The shape of an object.
///
/// ```
/// use blip_world::Shape;
///
/// assert_eq!(Shape::Circle.words(), ["circle", "ball", "disc"]);
/// assert_eq!(Shape::Diamond.name(), "diamond");
/// assert!(Shape::ALL.iter().all(|s| s.words()[0] == s.name()));
/// assert_eq!(serde_json::to_value(Shape::Star)?, "star");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// A disc.
    Circle,
    /// An axis-aligned square.
    Square,
    /// An upward-pointing triangle.
    Triangle,
    /// A five-pointed star.
    Star,
    /// A rhombus standing on a corner.
    Diamond,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 5] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Star,
        Shape::Diamond,
    ];

    /// The words captions use for this shape; the first is canonical.
    pub fn words(self) -> &'static [&'static str] {
        match self {
            Shape::Circle => &["circle", "ball", "disc"],
            Shape::Square => &["square", "box", "block"],
            Shape::Triangle => &["triangle"],
            Shape::Star => &["star"],
            Shape::Diamond => &["diamond", "rhombus"],
        }
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        self.words()[0]
    }
}

/// The colour of an object.
///
/// ```
/// use blip_world::Colour;
///
/// assert_eq!(Colour::Red.words(), ["red", "crimson", "scarlet"]);
/// assert_eq!(Colour::Blue.rgb(), [45, 85, 220]);
/// assert_eq!(serde_json::to_value(Colour::Purple)?, Colour::Purple.name());
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Colour {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
    /// Purple.
    Purple,
    /// Orange.
    Orange,
}

impl Colour {
    /// Every object colour.
    pub const ALL: [Colour; 6] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
    ];

    /// The words captions use for this colour; the first is canonical.
    pub fn words(self) -> &'static [&'static str] {
        match self {
            Colour::Red => &["red", "crimson", "scarlet"],
            Colour::Green => &["green", "emerald"],
            Colour::Blue => &["blue", "azure"],
            Colour::Yellow => &["yellow", "golden"],
            Colour::Purple => &["purple", "violet"],
            Colour::Orange => &["orange"],
        }
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        self.words()[0]
    }

    /// The nominal sRGB value (objects get a small per-object jitter around it).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [215, 40, 40],
            Colour::Green => [40, 165, 60],
            Colour::Blue => [45, 85, 220],
            Colour::Yellow => [240, 205, 35],
            Colour::Purple => [140, 60, 185],
            Colour::Orange => [245, 135, 25],
        }
    }
}

/// The size of an object.
///
/// ```
/// use blip_world::Size;
///
/// assert_eq!(Size::ALL.map(Size::name), ["small", "large"]);
/// assert!(Size::Large.words().contains(&"big"));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    /// Radius about 11 % of the image side.
    Small,
    /// Radius about 15 % of the image side.
    Large,
}

impl Size {
    /// Both sizes.
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    /// The words captions use for this size; the first is canonical.
    pub fn words(self) -> &'static [&'static str] {
        match self {
            Size::Small => &["small", "little", "tiny"],
            Size::Large => &["large", "big"],
        }
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        self.words()[0]
    }
}

/// Where an object sits: one of five cells of a 3 × 3 grid.
///
/// ```
/// use blip_world::{Position, Relation};
///
/// assert_eq!(Position::Left.cell(), (0, 1)); // (column, row)
/// assert_eq!(Position::Center.phrases()[0], "in the center");
/// assert!(Relation::LeftOf.holds(Position::Left, Position::Center));
/// assert!(!Relation::NextTo.holds(Position::Left, Position::Right));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    /// Middle row, left column.
    Left,
    /// Middle row, right column.
    Right,
    /// Top row, middle column.
    Top,
    /// Bottom row, middle column.
    Bottom,
    /// The centre cell.
    Center,
}

impl Position {
    /// Every position.
    pub const ALL: [Position; 5] = [
        Position::Left,
        Position::Right,
        Position::Top,
        Position::Bottom,
        Position::Center,
    ];

    /// The phrases captions use for this position; the first is canonical.
    pub fn phrases(self) -> &'static [&'static str] {
        match self {
            Position::Left => &["on the left", "on the left side"],
            Position::Right => &["on the right", "on the right side"],
            Position::Top => &["at the top", "near the top"],
            Position::Bottom => &["at the bottom", "near the bottom"],
            Position::Center => &["in the center", "in the middle", "in the centre"],
        }
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Position::Left => "left",
            Position::Right => "right",
            Position::Top => "top",
            Position::Bottom => "bottom",
            Position::Center => "center",
        }
    }

    /// `(column, row)` of the grid cell, each in `0..3`, row 0 at the top.
    pub fn cell(self) -> (i32, i32) {
        match self {
            Position::Left => (0, 1),
            Position::Right => (2, 1),
            Position::Top => (1, 0),
            Position::Bottom => (1, 2),
            Position::Center => (1, 1),
        }
    }
}

/// A spatial relation "subject RELATION object" between two objects.
///
/// ```
/// use blip_world::{Position, Relation};
///
/// assert_eq!(Relation::NextTo.name(), "next_to");
/// assert_eq!(Relation::Below.phrases(), ["below", "under", "beneath"]);
/// assert!(Relation::Above.holds(Position::Top, Position::Bottom));
/// assert!(Relation::ALL.iter().all(|r| !r.holds(Position::Top, Position::Top)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    /// The subject's column is left of the object's.
    LeftOf,
    /// The subject's column is right of the object's.
    RightOf,
    /// The subject's row is above the object's.
    Above,
    /// The subject's row is below the object's.
    Below,
    /// The two cells share an edge.
    NextTo,
}

impl Relation {
    /// Every relation.
    pub const ALL: [Relation; 5] = [
        Relation::LeftOf,
        Relation::RightOf,
        Relation::Above,
        Relation::Below,
        Relation::NextTo,
    ];

    /// The phrases captions use for this relation; the first is canonical.
    pub fn phrases(self) -> &'static [&'static str] {
        match self {
            Relation::LeftOf => &["to the left of", "left of"],
            Relation::RightOf => &["to the right of", "right of"],
            Relation::Above => &["above", "over"],
            Relation::Below => &["below", "under", "beneath"],
            Relation::NextTo => &["next to", "beside"],
        }
    }

    /// The canonical name (`left_of`, ...), as in the JSON files.
    pub fn name(self) -> &'static str {
        match self {
            Relation::LeftOf => "left_of",
            Relation::RightOf => "right_of",
            Relation::Above => "above",
            Relation::Below => "below",
            Relation::NextTo => "next_to",
        }
    }

    /// Whether "an object at `subject` RELATION an object at `object`" is true.
    pub fn holds(self, subject: Position, object: Position) -> bool {
        let ((sc, sr), (oc, or)) = (subject.cell(), object.cell());
        match self {
            Relation::LeftOf => sc < oc,
            Relation::RightOf => sc > oc,
            Relation::Above => sr < or,
            Relation::Below => sr > or,
            Relation::NextTo => (sc - oc).abs() + (sr - or).abs() == 1,
        }
    }
}

/// The background colour.
///
/// ```
/// use blip_world::Background;
///
/// assert_eq!(Background::Gray.words(), ["gray", "grey"]);
/// assert_eq!(Background::Black.rgb(), [22, 22, 26]);
/// assert_eq!(Background::ALL.map(Background::name), ["white", "gray", "black"]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Background {
    /// Near white.
    White,
    /// Mid grey.
    Gray,
    /// Near black.
    Black,
}

impl Background {
    /// Every background colour.
    pub const ALL: [Background; 3] = [Background::White, Background::Gray, Background::Black];

    /// The words captions use for this background; the first is canonical.
    pub fn words(self) -> &'static [&'static str] {
        match self {
            Background::White => &["white"],
            Background::Gray => &["gray", "grey"],
            Background::Black => &["black"],
        }
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        self.words()[0]
    }

    /// The nominal sRGB value.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Background::White => [242, 242, 238],
            Background::Gray => [128, 128, 132],
            Background::Black => [22, 22, 26],
        }
    }
}

/// The background texture.
///
/// ```
/// use blip_world::{Texture, scene};
///
/// assert_eq!(Texture::Speckled.words(), ["speckled", "grainy"]);
/// // A plain background is drawn in its nominal colour (the corner cell holds no object).
/// let s = (0..).map(|index| scene(7, index, 64)).find(|s| s.attributes().texture == Texture::Plain).unwrap();
/// assert_eq!(s.render().get_pixel(0, 0).0, s.attributes().background.rgb());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Texture {
    /// A flat colour.
    Plain,
    /// Light per-pixel noise.
    Speckled,
}

impl Texture {
    /// Both textures.
    pub const ALL: [Texture; 2] = [Texture::Plain, Texture::Speckled];

    /// The words captions use for this texture; the first is canonical.
    pub fn words(self) -> &'static [&'static str] {
        match self {
            Texture::Plain => &["plain"],
            Texture::Speckled => &["speckled", "grainy"],
        }
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        self.words()[0]
    }
}

/// Number words and the counts they state.
pub(crate) const COUNT_WORDS: [(&str, usize); 4] =
    [("one", 1), ("single", 1), ("two", 2), ("three", 3)];

/// The word for a count in captions (`1..=3`).
pub(crate) fn count_word(n: usize) -> &'static str {
    match n {
        1 => "one",
        2 => "two",
        _ => "three",
    }
}

/// An attribute a caption can get wrong (the kinds a `wrong_attribute` web text swaps).
///
/// ```
/// use blip_world::{AttributeKind, caption_mentions, scene};
///
/// assert_eq!(AttributeKind::Colour.name(), "colour");
/// let s = scene(7, 0, 64);
/// let o = &s.objects()[0];
/// let m = caption_mentions(&s, &format!("a {} {}", o.colour.name(), o.shape.name()));
/// assert_eq!((m.tally(AttributeKind::Colour).correct, m.tally(AttributeKind::Size).mentions()), (1, 0));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttributeKind {
    /// An object's shape.
    Shape,
    /// An object's colour.
    Colour,
    /// An object's size.
    Size,
    /// An object's position.
    Position,
    /// The relation between two objects.
    Relation,
}

impl AttributeKind {
    /// Every kind.
    pub const ALL: [AttributeKind; 5] = [
        AttributeKind::Shape,
        AttributeKind::Colour,
        AttributeKind::Size,
        AttributeKind::Position,
        AttributeKind::Relation,
    ];

    /// The canonical name, as in the labels file.
    pub fn name(self) -> &'static str {
        match self {
            AttributeKind::Shape => "shape",
            AttributeKind::Colour => "colour",
            AttributeKind::Size => "size",
            AttributeKind::Position => "position",
            AttributeKind::Relation => "relation",
        }
    }
}
