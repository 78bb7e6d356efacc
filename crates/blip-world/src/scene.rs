//! Scenes: 1–3 coloured shapes on a plain or speckled background, and their rendering.

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use crate::vocab::{Background, Colour, Position, Relation, Shape, Size, Texture};
use blip_core::split_mix64 as mix64;

/// Stream tag of the scene layout draws (see [`SplitMix64::derive`]).
pub(crate) const STREAM_SCENE: u64 = 1;

/// One object of a scene: its attributes and where it was drawn.
///
/// ```
/// use blip_world::scene;
///
/// let s = scene(7, 0, 64);
/// for o in s.objects() {
///     let [x0, y0, x1, y1] = o.bbox;
///     assert!(x0 < x1 && y0 < y1 && x1 <= 64 && y1 <= 64);
///     assert!(o.radius > 0.0 && o.radius < 0.2); // a fraction of the image side
/// }
/// let json = serde_json::to_value(&s.objects()[0])?;
/// assert_eq!(json["shape"], s.objects()[0].shape.name());
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectAttributes {
    /// The shape.
    pub shape: Shape,
    /// The nominal colour.
    pub colour: Colour,
    /// Small or large.
    pub size: Size,
    /// The grid cell the object sits in.
    pub position: Position,
    /// Centre `[x, y]` as fractions of the image side (y down), to five decimals.
    pub center: [f64; 2],
    /// Radius of the circumscribed circle as a fraction of the image side, to five decimals.
    pub radius: f64,
    /// Pixel bounding box `[x0, y0, x1, y1]` (exclusive end) of the circumscribed circle at
    /// the scene's image size, clamped to the image.
    pub bbox: [u32; 4],
    /// The exact fill colour drawn (the nominal colour with a small jitter).
    pub rgb: [u8; 3],
}

/// The relations that hold from one object to another.
///
/// ```
/// use blip_world::scene;
///
/// let s = (0..).map(|index| scene(7, index, 64)).find(|s| s.objects().len() == 2).unwrap();
/// let fact = &s.attributes().relations[0];
/// assert_eq!((fact.subject, fact.object), (0, 1));
/// assert!(!fact.relations.is_empty());
/// assert!(fact.relations.iter().all(|&r| s.attributes().relation_holds(0, r, 1)));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationFact {
    /// Index of the subject object in [`SceneAttributes::objects`].
    pub subject: usize,
    /// Index of the other object.
    pub object: usize,
    /// Every relation "subject R object" that holds (never empty).
    pub relations: Vec<Relation>,
}

/// Everything true about a scene: the ground truth captions are checked against.
///
/// ```
/// use blip_world::{SceneAttributes, scene};
///
/// let s = scene(7, 0, 64);
/// let attrs = s.attributes();
/// assert_eq!(attrs.image_size, 64);
/// let n = attrs.objects.len();
/// assert!((1..=3).contains(&n));
/// assert_eq!(attrs.relations.len(), n * (n - 1)); // every ordered pair
/// let json = serde_json::to_string(attrs)?;
/// assert_eq!(&serde_json::from_str::<SceneAttributes>(&json)?, attrs);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SceneAttributes {
    /// Side of the rendered square image in pixels.
    pub image_size: u32,
    /// Background colour.
    pub background: Background,
    /// Background texture.
    pub texture: Texture,
    /// The objects (1 to 3), no two with the same shape and colour, each in its own cell.
    pub objects: Vec<ObjectAttributes>,
    /// For every ordered pair of distinct objects, the relations that hold.
    pub relations: Vec<RelationFact>,
}

impl SceneAttributes {
    /// Whether "object `subject` RELATION object `object`" holds.
    pub fn relation_holds(&self, subject: usize, relation: Relation, object: usize) -> bool {
        subject != object
            && relation.holds(
                self.objects[subject].position,
                self.objects[object].position,
            )
    }
}

impl AsRef<SceneAttributes> for SceneAttributes {
    fn as_ref(&self) -> &SceneAttributes {
        self
    }
}

/// A scene of the world: deterministic from `(seed, index)`.
///
/// ```
/// use blip_world::{SplitMix64, scene};
///
/// let s = scene(7, 3, 64);
/// assert_eq!((s.seed(), s.index()), (7, 3));
/// assert_eq!(s, scene(7, 3, 64)); // a function of (seed, index)
/// assert_eq!(s.render(), scene(7, 3, 64).render());
/// assert_eq!(s.captions_n(&mut SplitMix64::new(1), 3).len(), 3);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    seed: u64,
    index: u64,
    attributes: SceneAttributes,
    noise_seed: u64,
}

impl AsRef<SceneAttributes> for Scene {
    fn as_ref(&self) -> &SceneAttributes {
        &self.attributes
    }
}

/// The scene number `index` of the world seeded with `seed`, laid out for `image_size`
/// pixels (the layout is independent of the size; only pixel boxes depend on it).
///
/// # Panics
/// If `image_size < 8`.
///
/// ```
/// use blip_world::scene;
///
/// let (small, large) = (scene(7, 0, 64), scene(7, 0, 96));
/// // The layout does not depend on the size; pixel boxes do.
/// assert_eq!(small.objects()[0].center, large.objects()[0].center);
/// assert_eq!(small.objects().len(), large.objects().len());
/// assert_eq!(large.render().dimensions(), (96, 96));
/// ```
pub fn scene(seed: u64, index: u64, image_size: u32) -> Scene {
    assert!(image_size >= 8, "image_size {image_size} is below 8 pixels");
    let mut rng = crate::stream(seed, &[STREAM_SCENE, index]);
    let count = rng.weighted(&[0.35, 0.40, 0.25]) + 1;
    let mut positions = Position::ALL;
    rng.shuffle(&mut positions);
    let mut objects: Vec<ObjectAttributes> = Vec::with_capacity(count);
    let side = image_size as f64;
    for &position in &positions[..count] {
        let (shape, colour) = loop {
            let shape = *rng.pick(&Shape::ALL);
            let colour = *rng.pick(&Colour::ALL);
            if !objects
                .iter()
                .any(|o| o.shape == shape && o.colour == colour)
            {
                break (shape, colour);
            }
        };
        let size = *rng.pick(&Size::ALL);
        let nominal = match size {
            // 0.11, not smaller: a ViT with 8-px patches learns the shape of an 11-px
            // object (radius 0.085 at 64 px) several times slower than that of a 14-px one
            // (measured with a shape classifier; docs/world.md).
            Size::Small => 0.11,
            Size::Large => 0.15,
        };
        let radius = nominal * rng.range_f64(0.93, 1.07);
        let (col, row) = position.cell();
        let jitter = (1.0 / 6.0 - radius - 0.015).max(0.0);
        let cx = (col as f64 + 0.5) / 3.0 + rng.range_f64(-jitter, jitter);
        let cy = (row as f64 + 0.5) / 3.0 + rng.range_f64(-jitter, jitter);
        // Five decimals: short enough that JSON round-trips the values exactly.
        let round = |v: f64| (v * 1e5).round() / 1e5;
        let (cx, cy, radius) = (round(cx), round(cy), round(radius));
        let mut rgb = colour.rgb();
        for c in &mut rgb {
            *c = (*c as i32 + rng.below(25) as i32 - 12).clamp(0, 255) as u8;
        }
        let px = |v: f64| (v * side).clamp(0.0, side);
        let bbox = [
            px(cx - radius).floor() as u32,
            px(cy - radius).floor() as u32,
            px(cx + radius).ceil() as u32,
            px(cy + radius).ceil() as u32,
        ];
        objects.push(ObjectAttributes {
            shape,
            colour,
            size,
            position,
            center: [cx, cy],
            radius,
            bbox,
            rgb,
        });
    }
    let background = *rng.pick(&Background::ALL);
    let texture = if rng.chance(0.5) {
        Texture::Speckled
    } else {
        Texture::Plain
    };
    let noise_seed = rng.next_u64();
    let mut relations = Vec::new();
    for (i, a) in objects.iter().enumerate() {
        for (j, b) in objects.iter().enumerate() {
            if i != j {
                let holds: Vec<Relation> = Relation::ALL
                    .into_iter()
                    .filter(|r| r.holds(a.position, b.position))
                    .collect();
                relations.push(RelationFact {
                    subject: i,
                    object: j,
                    relations: holds,
                });
            }
        }
    }
    Scene {
        seed,
        index,
        attributes: SceneAttributes {
            image_size,
            background,
            texture,
            objects,
            relations,
        },
        noise_seed,
    }
}

impl Scene {
    /// The world seed the scene was drawn from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The scene's index in the world.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The ground truth.
    pub fn attributes(&self) -> &SceneAttributes {
        &self.attributes
    }

    /// The objects (shorthand for `attributes().objects`).
    pub fn objects(&self) -> &[ObjectAttributes] {
        &self.attributes.objects
    }

    /// Draws the scene: background (with its speckle), then each object, anti-aliased with
    /// 3 × 3 samples per pixel. Deterministic down to the byte.
    pub fn render(&self) -> RgbImage {
        let attrs = &self.attributes;
        let size = attrs.image_size;
        let base = attrs.background.rgb();
        let mut img = RgbImage::new(size, size);
        for y in 0..size {
            for x in 0..size {
                let offset = match attrs.texture {
                    Texture::Plain => 0,
                    Texture::Speckled => {
                        let h = mix64(self.noise_seed ^ (u64::from(y) << 32 | u64::from(x)));
                        (h % 29) as i32 - 14
                    }
                };
                let px = base.map(|c| (c as i32 + offset).clamp(0, 255) as u8);
                img.put_pixel(x, y, Rgb(px));
            }
        }
        let star = star_polygon();
        let side = size as f64;
        for object in &attrs.objects {
            let (cx, cy, r) = (
                object.center[0] * side,
                object.center[1] * side,
                object.radius * side,
            );
            let [x0, y0, x1, y1] = object.bbox;
            for y in y0..y1.min(size) {
                for x in x0..x1.min(size) {
                    let mut inside = 0u32;
                    for sy in 0..3 {
                        for sx in 0..3 {
                            let u = (x as f64 + (sx as f64 + 0.5) / 3.0 - cx) / r;
                            let v = (y as f64 + (sy as f64 + 0.5) / 3.0 - cy) / r;
                            if contains(object.shape, u, v, &star) {
                                inside += 1;
                            }
                        }
                    }
                    if inside == 0 {
                        continue;
                    }
                    let pixel = img.get_pixel_mut(x, y);
                    for (c, &fill) in pixel.0.iter_mut().zip(&object.rgb) {
                        let blended = (*c as u32 * (9 - inside) + fill as u32 * inside + 4) / 9;
                        *c = blended as u8;
                    }
                }
            }
        }
        img
    }
}

/// Vertices of a five-pointed star (outer radius 0.94, inner 0.42), point up, nudged down
/// so that it looks centred; all within the unit circle.
fn star_polygon() -> [(f64, f64); 10] {
    let mut v = [(0.0, 0.0); 10];
    for (k, p) in v.iter_mut().enumerate() {
        let radius = if k % 2 == 0 { 0.94 } else { 0.42 };
        let angle = -std::f64::consts::FRAC_PI_2 + k as f64 * std::f64::consts::PI / 5.0;
        *p = (radius * angle.cos(), radius * angle.sin() + 0.05);
    }
    v
}

/// Whether `(u, v)` (in units of the radius, relative to the centre, y down) is inside.
fn contains(shape: Shape, u: f64, v: f64, star: &[(f64, f64); 10]) -> bool {
    match shape {
        Shape::Circle => u * u + v * v <= 1.0,
        Shape::Square => u.abs() <= 0.7 && v.abs() <= 0.7,
        // Apex (0, -0.95), base corners (±0.714, 0.7): all within the unit circle.
        Shape::Triangle => (-0.95..=0.7).contains(&v) && u.abs() <= (v + 0.95) * 0.4327,
        Shape::Diamond => u.abs() / 0.72 + v.abs() <= 1.0,
        Shape::Star => {
            // Even–odd ray casting.
            let mut inside = false;
            let mut j = star.len() - 1;
            for i in 0..star.len() {
                let (xi, yi) = star[i];
                let (xj, yj) = star[j];
                if (yi > v) != (yj > v) && u < (xj - xi) * (v - yi) / (yj - yi) + xi {
                    inside = !inside;
                }
                j = i;
            }
            inside
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_valid() {
        for index in 0..200 {
            let a = scene(11, index, 64);
            assert_eq!(a, scene(11, index, 64));
            let objects = a.objects();
            assert!((1..=3).contains(&objects.len()));
            for (i, o) in objects.iter().enumerate() {
                for p in &objects[..i] {
                    assert_ne!(p.position, o.position);
                    assert!((p.shape, p.colour) != (o.shape, o.colour));
                }
                // Stays inside its cell.
                let (col, row) = o.position.cell();
                assert!(o.center[0] - o.radius >= col as f64 / 3.0);
                assert!(o.center[0] + o.radius <= (col + 1) as f64 / 3.0);
                assert!(o.center[1] - o.radius >= row as f64 / 3.0);
                assert!(o.center[1] + o.radius <= (row + 1) as f64 / 3.0);
            }
            let n = objects.len();
            assert_eq!(a.attributes().relations.len(), n * (n - 1));
            assert!(
                a.attributes()
                    .relations
                    .iter()
                    .all(|f| !f.relations.is_empty())
            );
        }
        assert_ne!(scene(11, 0, 64), scene(12, 0, 64));
    }

    #[test]
    fn render_draws_the_objects() {
        for index in 0..20 {
            let s = scene(5, index, 80);
            let img = s.render();
            assert_eq!(img.dimensions(), (80, 80));
            assert_eq!(img, s.render());
            for o in s.objects() {
                // The centre pixel carries the object's colour.
                let x = (o.center[0] * 80.0) as u32;
                let y = (o.center[1] * 80.0) as u32;
                let p = img.get_pixel(x, y).0;
                let d: i32 = p
                    .iter()
                    .zip(&o.rgb)
                    .map(|(a, b)| (*a as i32 - *b as i32).abs())
                    .sum();
                assert!(d <= 6, "{:?} at {x},{y}: {p:?} vs {:?}", o.shape, o.rgb);
            }
        }
    }

    #[test]
    fn relations_follow_the_grid() {
        use Position::*;
        assert!(Relation::LeftOf.holds(Left, Right));
        assert!(Relation::RightOf.holds(Right, Center));
        assert!(Relation::Above.holds(Top, Bottom));
        assert!(Relation::Below.holds(Left, Top));
        assert!(Relation::NextTo.holds(Center, Top));
        assert!(!Relation::NextTo.holds(Left, Right));
        assert!(!Relation::NextTo.holds(Left, Top));
    }
}
