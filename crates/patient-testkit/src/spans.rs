//! A `tracing` layer that records every span (its name, fields, parent and
//! whether it closed) and every event's fields, for tests that check what
//! an operator would see.
//!
//! [`SpanRecorder::install`] sets it as the thread's default subscriber:
//! a `#[tokio::test]` on the current-thread runtime sees the spans of
//! everything spawned on that runtime.
//!
//! ```
//! use patient_testkit::spans::SpanRecorder;
//!
//! let (recorder, _guard) = SpanRecorder::install();
//! tracing::info_span!("work", job.id = 7).in_scope(|| {
//!     tracing::info_span!("part").in_scope(|| {});
//! });
//! let work = recorder.one("work");
//! assert_eq!(work.field("job.id"), Some("7"));
//! assert!(work.closed);
//! assert_eq!(recorder.children_of(&work)[0].name, "part");
//! ```

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex, MutexGuard},
};

use tracing::{
    field::{Field, Visit},
    span, Event, Subscriber,
};
use tracing_subscriber::{layer::Context, prelude::*, registry::LookupSpan, Layer};

/// A span as recorded.
#[derive(Debug, Clone)]
pub struct RecordedSpan {
    /// A number unique to this span (the subscriber's ids are reused).
    pub seq: u64,
    /// Its name.
    pub name: &'static str,
    /// The parent's [`seq`](Self::seq), if it has a parent.
    pub parent: Option<u64>,
    /// Its fields, those recorded later included, as text (`Debug` for
    /// values given with `?`).
    pub fields: BTreeMap<String, String>,
    /// Whether it has closed (its last handle dropped).
    pub closed: bool,
}

impl RecordedSpan {
    /// The value of a field, if it was recorded.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

#[derive(Default)]
struct Records {
    spans: Vec<RecordedSpan>,
    /// Every event's fields, `message` included.
    events: Vec<BTreeMap<String, String>>,
}

/// What the layer recorded; cheap to clone.
#[derive(Clone, Default)]
pub struct SpanRecorder {
    records: Arc<Mutex<Records>>,
}

impl fmt::Debug for SpanRecorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanRecorder").finish_non_exhaustive()
    }
}

/// The layer of a [`SpanRecorder`].
#[derive(Debug, Clone)]
pub struct RecordingLayer {
    recorder: SpanRecorder,
}

/// The [`RecordedSpan::seq`] of a live span, in its extensions.
struct Seq(u64);

impl SpanRecorder {
    /// A recorder and its layer, to put on a subscriber of one's own.
    pub fn new() -> (SpanRecorder, RecordingLayer) {
        let recorder = SpanRecorder::default();
        let layer = RecordingLayer {
            recorder: recorder.clone(),
        };
        (recorder, layer)
    }

    /// A recorder installed as this thread's default subscriber until the
    /// guard is dropped.
    pub fn install() -> (SpanRecorder, tracing::subscriber::DefaultGuard) {
        let (recorder, layer) = SpanRecorder::new();
        let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
        (recorder, guard)
    }

    fn lock(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every span so far, in the order they were created.
    pub fn spans(&self) -> Vec<RecordedSpan> {
        self.lock().spans.clone()
    }

    /// The spans named `name`, in the order they were created.
    pub fn named(&self, name: &str) -> Vec<RecordedSpan> {
        self.lock()
            .spans
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }

    /// The one span named `name`; panics when there are none or several.
    pub fn one(&self, name: &str) -> RecordedSpan {
        let mut named = self.named(name);
        assert_eq!(named.len(), 1, "one span {name:?} expected, got {named:#?}");
        named.remove(0)
    }

    /// The spans whose parent is `parent`.
    pub fn children_of(&self, parent: &RecordedSpan) -> Vec<RecordedSpan> {
        self.lock()
            .spans
            .iter()
            .filter(|s| s.parent == Some(parent.seq))
            .cloned()
            .collect()
    }

    /// The fields of every event so far.
    pub fn events(&self) -> Vec<BTreeMap<String, String>> {
        self.lock().events.clone()
    }

    /// Every recorded value, of spans and events: to check that some text
    /// (a secret) appears nowhere.
    pub fn all_values(&self) -> Vec<String> {
        let records = self.lock();
        records
            .spans
            .iter()
            .flat_map(|s| s.fields.values())
            .chain(records.events.iter().flat_map(|e| e.values()))
            .cloned()
            .collect()
    }
}

/// Writes the fields it visits into a map.
struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S> Layer<S> for RecordingLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let parent = span
            .parent()
            .and_then(|p| p.extensions().get::<Seq>().map(|s| s.0));
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut records = self.recorder.lock();
        let seq = records.spans.len() as u64;
        records.spans.push(RecordedSpan {
            seq,
            name: attrs.metadata().name(),
            parent,
            fields,
            closed: false,
        });
        drop(records);
        span.extensions_mut().insert(Seq(seq));
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(seq) = ctx
            .span(id)
            .and_then(|s| s.extensions().get::<Seq>().map(|s| s.0))
        else {
            return;
        };
        let mut records = self.recorder.lock();
        if let Some(span) = records.spans.get_mut(seq as usize) {
            values.record(&mut Fields(&mut span.fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.recorder.lock().events.push(fields);
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        let Some(seq) = ctx
            .span(&id)
            .and_then(|s| s.extensions().get::<Seq>().map(|s| s.0))
        else {
            return;
        };
        if let Some(span) = self.recorder.lock().spans.get_mut(seq as usize) {
            span.closed = true;
        }
    }
}
