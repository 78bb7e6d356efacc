//! CapFilt (BLIP §3): a captioner writes synthetic captions for web images, a filter drops
//! the web and synthetic texts whose image–text match it rejects, and the cleaned data set
//! is written in BLIP's annotation format with a provenance record per text.

#![warn(missing_docs)]
