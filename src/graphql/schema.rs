//! The served schema. `schema.graphql` at the repo root is its SDL.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_graphql::dataloader::DataLoader;
use async_graphql::{
    Context, EmptyMutation, Enum, ErrorExtensions, InputObject, InputValueResult, Object, Scalar,
    ScalarType, Schema, SimpleObject, Subscription,
};
use futures_util::{Stream, StreamExt};

use super::errors::ResolverError;
use super::loader::AggregateLoader;
use crate::aggregate::{Aggregator, Answer, CacheStatus, ServedEntry};
use crate::auth::{AccessError, AuthError, Identity};
use crate::bi::BiClient;
use crate::bi::protocol::MetaMember;
use crate::cache::{AnswerError, unix_millis};
use crate::catalog::{Catalog, CatalogStore};
use crate::config::{GraphqlLimits, QueryLimits};
use crate::live::{ConnectionSubscriptions, Live};
use crate::query::{
    AggregateQuery, PlannedQuery, Planner, RawAggregate, RawFilter, RawOptions, RawOrder,
};
use crate::telemetry;

pub type GatewaySchema = Schema<QueryRoot, EmptyMutation, SubscriptionRoot>;

/// What the answers of one request were like, gathered by the resolvers
/// for the HTTP layer: whether any was produced without cross-instance
/// coordination (the response says it is degraded) or served stale, and how
/// long they all stay fresh (how long a browser may keep the response).
#[derive(Clone)]
pub struct AnswerFacts(Arc<Facts>);

struct Facts {
    degraded: AtomicBool,
    stale: AtomicBool,
    /// The shortest fresh time left among the answers, in ms; `u64::MAX`
    /// while there is none.
    fresh_for_ms: AtomicU64,
    /// Every answer with its entry, while all of them are fresh hits;
    /// `None` after any other.
    hits: Mutex<Option<Vec<ServedEntry>>>,
}

impl Default for AnswerFacts {
    fn default() -> AnswerFacts {
        AnswerFacts(Arc::new(Facts {
            degraded: AtomicBool::new(false),
            stale: AtomicBool::new(false),
            fresh_for_ms: AtomicU64::new(u64::MAX),
            hits: Mutex::new(Some(Vec::new())),
        }))
    }
}

impl AnswerFacts {
    fn record(&self, query: &PlannedQuery, answer: &Answer) {
        {
            let mut hits = self.0.hits.lock().unwrap_or_else(|p| p.into_inner());
            let plain_hit = answer.status == CacheStatus::Hit && !answer.stale && !answer.degraded;
            match hits.as_mut() {
                Some(hits) if plain_hit => hits.push((query.clone(), Arc::clone(&answer.entry))),
                _ => *hits = None,
            }
        }
        if answer.degraded {
            self.0.degraded.store(true, Ordering::Relaxed);
        }
        if answer.stale {
            self.0.stale.store(true, Ordering::Relaxed);
        }
        let fresh_for = answer.entry.fresh_left().as_millis() as u64;
        self.0.fresh_for_ms.fetch_min(fresh_for, Ordering::Relaxed);
    }

    pub fn degraded(&self) -> bool {
        self.0.degraded.load(Ordering::Relaxed)
    }

    pub fn stale(&self) -> bool {
        self.0.stale.load(Ordering::Relaxed)
    }

    /// The entries behind the answers, when there were some and every one
    /// was a fresh hit (not stale, not degraded); `None` otherwise.
    pub fn hits(&self) -> Option<Vec<ServedEntry>> {
        let hits = self.0.hits.lock().unwrap_or_else(|p| p.into_inner());
        hits.as_ref().filter(|hits| !hits.is_empty()).cloned()
    }

    /// How long every answer stays fresh; `None` when there was none.
    pub fn fresh_for(&self) -> Option<std::time::Duration> {
        match self.0.fresh_for_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }
}

/// What resolvers need, shared by all requests.
#[derive(Clone)]
pub struct SchemaContext {
    pub aggregator: Arc<Aggregator>,
    pub planner: Planner,
    pub limits: QueryLimits,
    pub catalog: Arc<CatalogStore>,
    pub bi: BiClient,
    /// Whether customer ids may go into span attributes (they can be personal data).
    pub trace_customer_ids: bool,
    /// The live keys of `aggregateLive`.
    pub live: Arc<Live>,
}

/// The served schema; `suggestions: false` drops "did you mean" hints from
/// errors (for callers who must not learn the schema).
pub fn build_schema(
    context: SchemaContext,
    limits: &GraphqlLimits,
    suggestions: bool,
) -> GatewaySchema {
    let builder = Schema::build(QueryRoot, EmptyMutation, SubscriptionRoot)
        .data(context)
        // No `limit_depth`: async-graphql would count introspection's own
        // nesting, which refuses GraphiQL's standard introspection query.
        // `limits::check_document` counts depth without it and gives
        // introspection bounds of its own.
        .limit_complexity(limits.max_complexity)
        .limit_directives(limits.max_directives_per_field)
        .limit_recursive_depth(limits.max_recursive_depth);
    if suggestions {
        builder.finish()
    } else {
        builder.disable_suggestions().finish()
    }
}

/// The SDL of the served schema, for `schema.graphql`.
pub fn schema_sdl() -> String {
    Schema::build(QueryRoot, EmptyMutation, SubscriptionRoot)
        .finish()
        .sdl()
}

pub struct QueryRoot;

pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// One panel, live (over WebSocket, `graphql-transport-ws`): the first
    /// event at once, then one each time a refresh brings different rows.
    /// The panel is refreshed every `everySeconds` (at least, and by
    /// default, the gateway's LIVE_MIN_INTERVAL_SECS), once for every
    /// instance and subscriber; the shortest interval any subscriber of the
    /// panel asks for applies to all.
    async fn aggregate_live(
        &self,
        ctx: &Context<'_>,
        input: AggregateInput,
        every_seconds: Option<i32>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<AggregateResult>> + use<>>
    {
        let shared = ctx.data::<SchemaContext>()?;
        let (query, planned) = plan_input(ctx, shared, &input)?;
        let connection = ctx
            .data_opt::<ConnectionSubscriptions>()
            .cloned()
            .unwrap_or_default();
        let key = planned.key.short().to_owned();
        let limit = query.limit();
        let interval = shared.live.interval(every_seconds);
        if !shared.live.is_live(&planned.key) {
            // A key new to this instance may cost a BI query: counted
            // against the caller's quota like one.
            let identity = ctx.data_opt::<Identity>().unwrap_or(&Identity::Open);
            super::loader::spend_quota(shared.live.counters().as_ref(), identity, 1)
                .await
                .map_err(|err| ResolverError::from(err).extend())?;
        }
        let subscription = shared
            .live
            .subscribe(planned, interval, &connection)
            .map_err(|refusal| ResolverError::from(refusal).extend())?;
        Ok(subscription.events().map(move |event| match &event.answer {
            Ok(answer) => Ok(AggregateResult {
                answer: answer.clone(),
                key: key.clone(),
                limit,
            }),
            Err(error) => Err(ResolverError::from(error.clone()).extend()),
        }))
    }
}

/// One panel's question.
#[derive(Debug, InputObject)]
pub struct AggregateInput {
    /// The customer (tenant) whose data is asked for.
    customer: String,
    date_range: DateRangeInput,
    /// Measures like `Sales.revenue`; at least one.
    measures: Vec<String>,
    /// Dimensions like `Sales.region` to group by.
    dimensions: Option<Vec<String>>,
    /// Time buckets; absent means totals over the whole range.
    granularity: Option<Granularity>,
    /// ANDed; the gateway's customer filter is always added and cannot be
    /// overridden (a filter on a customer member is refused).
    filters: Option<Vec<FilterInput>>,
    /// Members of the query only (its measures, dimensions, and its time
    /// dimension when it has a granularity), in priority order.
    order: Option<Vec<OrderInput>>,
    /// At most BI_ROW_LIMIT (also what applies without it).
    limit: Option<i32>,
    /// Rows skipped before the first one answered.
    offset: Option<i32>,
    /// An IANA name like `America/New_York`; default `UTC`. Day boundaries
    /// of `dateRange` and of the buckets are this timezone's.
    timezone: Option<String>,
}

/// One filter: `member operator values`. `SET` and `NOT_SET` take no
/// values, `GT`, `GTE`, `LT` and `LTE` one number, the others one or more
/// (ORed for the positive operators).
#[derive(Debug, InputObject)]
pub struct FilterInput {
    member: String,
    operator: FilterOperator,
    values: Option<Vec<String>>,
}

/// Cube's filter operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[graphql(remote = "crate::query::FilterOperator")]
pub enum FilterOperator {
    Equals,
    NotEquals,
    Contains,
    NotContains,
    StartsWith,
    EndsWith,
    Gt,
    Gte,
    Lt,
    Lte,
    Set,
    NotSet,
}

/// One `order` entry.
#[derive(Debug, InputObject)]
pub struct OrderInput {
    member: String,
    #[graphql(default_with = "OrderDirection::Asc")]
    direction: OrderDirection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[graphql(remote = "crate::query::OrderDirection")]
pub enum OrderDirection {
    Asc,
    Desc,
}

/// Time buckets, as GraphQL spells them; lower-case on the BI's wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[graphql(remote = "crate::query::Granularity")]
pub enum Granularity {
    Hour,
    Day,
    Week,
    Month,
    Quarter,
    Year,
}

/// Both ends included, as `YYYY-MM-DD`.
#[derive(Debug, InputObject)]
pub struct DateRangeInput {
    from: String,
    to: String,
}

#[Object]
impl QueryRoot {
    /// Aggregates of measures over a date range for one customer. Several
    /// `aggregate` fields in one document are fetched together.
    async fn aggregate(
        &self,
        ctx: &Context<'_>,
        input: AggregateInput,
    ) -> async_graphql::Result<AggregateResult> {
        let shared = ctx.data::<SchemaContext>()?;
        let (query, planned) = plan_input(ctx, shared, &input)?;

        // Answers already in process memory skip the dataloader's batch window.
        let answer = match shared.aggregator.peek(&planned) {
            Some(answer) => answer,
            None => {
                let loader = ctx.data::<DataLoader<AggregateLoader>>()?;
                let loaded = loader.load_one(planned.clone()).await;
                match loaded {
                    Ok(Some(answer)) => answer,
                    Ok(None) => Err(AnswerError::internal("the dataloader lost a key")),
                    Err(never) => match never {},
                }
            }
        };
        let answer = answer.map_err(|err| ResolverError::from(err).extend())?;
        if let Some(facts) = ctx.data_opt::<AnswerFacts>() {
            facts.record(&planned, &answer);
        }

        // The request's span links to the BI call that paid for these rows,
        // so an operator goes from any request to that call in one click.
        let request_span = tracing::Span::current();
        if answer.status != CacheStatus::Miss {
            telemetry::link_to_producer(&request_span, &answer.entry);
        }
        if shared.trace_customer_ids {
            request_span.record("customer", query.customer());
        }
        Ok(AggregateResult {
            answer,
            key: planned.key.short().to_owned(),
            limit: query.limit(),
        })
    }

    /// The cubes, measures and dimensions the BI offers: what `aggregate` can ask for.
    async fn catalog(&self, ctx: &Context<'_>) -> async_graphql::Result<CatalogView> {
        let shared = ctx.data::<SchemaContext>()?;
        if let Some(Identity::Unauthenticated(err)) = ctx.data_opt::<Identity>() {
            return Err(ResolverError::from(AccessError::Unauthenticated(err.clone())).extend());
        }
        let catalog = shared
            .catalog
            .get_or_fetch(&shared.bi)
            .await
            .map_err(|err| ResolverError::Answer(crate::aggregate::answer_error(&err)).extend())?;
        Ok(CatalogView(catalog))
    }
}

/// Who asks and what: `input` validated into an `AggregateQuery` (once) and
/// planned, after the caller's identity and its access to the customer are
/// settled (before anything else, the cache included).
fn plan_input(
    ctx: &Context<'_>,
    shared: &SchemaContext,
    input: &AggregateInput,
) -> async_graphql::Result<(AggregateQuery, PlannedQuery)> {
    let identity = ctx.data_opt::<Identity>().unwrap_or(&Identity::Open);
    // Who is asking is settled before anything else, the cache included.
    if let Identity::Unauthenticated(err) = identity {
        return Err(ResolverError::from(AccessError::Unauthenticated(err.clone())).extend());
    }
    // A WebSocket's identity was settled at its `connection_init`: a JWT
    // that has expired since is no credential for a new subscription.
    if identity
        .expires_at()
        .is_some_and(|exp| exp.saturating_mul(1000) <= unix_millis())
    {
        let expired = AuthError::InvalidToken("the token has expired".into());
        return Err(ResolverError::from(AccessError::Unauthenticated(expired)).extend());
    }
    let catalog = shared.catalog.get();
    let query = AggregateQuery::parse_with(
        RawAggregate {
            customer: &input.customer,
            from: &input.date_range.from,
            to: &input.date_range.to,
            measures: &input.measures,
            dimensions: input.dimensions.as_deref().unwrap_or_default(),
            granularity: input.granularity.map(Into::into),
        },
        RawOptions {
            filters: input
                .filters
                .iter()
                .flatten()
                .map(|f| RawFilter {
                    member: &f.member,
                    operator: f.operator.into(),
                    values: f.values.as_deref().unwrap_or_default(),
                })
                .collect(),
            order: input
                .order
                .iter()
                .flatten()
                .map(|o| RawOrder {
                    member: &o.member,
                    direction: o.direction.into(),
                })
                .collect(),
            limit: input.limit.map(i64::from),
            offset: input.offset.map(i64::from),
            timezone: input.timezone.as_deref(),
        },
        &shared.limits,
        catalog.as_deref(),
    )
    .map_err(|err| ResolverError::from(err).extend())?;
    identity
        .may_query(query.customer())
        .map_err(|err| ResolverError::from(err).extend())?;
    let planned = shared.planner.plan(&query);
    Ok((query, planned))
}

/// One `aggregate` answer.
pub struct AggregateResult {
    answer: Answer,
    key: String,
    /// The query's own limit (its `limit`, or BI_ROW_LIMIT).
    limit: u32,
}

#[Object]
impl AggregateResult {
    /// The BI's rows for this query, one object per row keyed by member name,
    /// in the BI's order.
    async fn rows(&self) -> Vec<&JsonRow> {
        let entry = &self.answer.entry;
        // Built once per entry: converting rows into GraphQL values hashes
        // every key, the largest cost of a cached hit after serialising.
        let rendered = entry.rendered.get_or_init(|| {
            entry
                .rows
                .iter()
                .map(|row| JsonRow(async_graphql::to_value(row).unwrap_or_default()))
                .collect::<Vec<JsonRow>>()
        });
        rendered
            .map(|rows| rows.iter().collect())
            .unwrap_or_default()
    }

    /// Where this answer came from.
    async fn cache(&self) -> CacheInfo {
        let entry = &self.answer.entry;
        let produced_at_ms = entry.produced_at_us / 1000;
        // Instants on this process's wall clock, from the entry's lifetimes:
        // what the instance serving the answer knows.
        let now_ms = unix_millis();
        let instant = |ms: u64| {
            chrono::DateTime::from_timestamp_millis(ms as i64)
                .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_default()
        };
        CacheInfo {
            status: self.answer.status,
            stale: self.answer.stale,
            key: self.key.clone(),
            produced_at: instant(produced_at_ms),
            fresh_until: instant(now_ms + entry.fresh_left().as_millis() as u64),
            stale_until: instant(now_ms + entry.time_left().as_millis() as u64),
            age_seconds: now_ms.saturating_sub(produced_at_ms) as f64 / 1000.0,
            expires_in_seconds: entry.fresh_left().as_secs_f64(),
            produced_by: entry.producer.clone(),
            trace_id: entry.trace_id.clone(),
        }
    }

    /// Number of rows.
    async fn row_count(&self) -> usize {
        self.answer.entry.rows.len()
    }

    /// True when the BI returned as many rows as the query's limit (its
    /// `limit`, or else BI_ROW_LIMIT): rows past it may have been dropped.
    async fn may_be_truncated(&self) -> bool {
        // The query's own limit, not the entry's: one entry answers one
        // question, and its question's limit is what cut it.
        self.answer.entry.rows.len() >= self.limit as usize
    }
}

/// One BI row: a JSON object keyed by member name. Served as the same `JSON`
/// scalar as async-graphql's own, but from a value built once per entry.
pub struct JsonRow(async_graphql::Value);

/// A scalar that can represent any JSON value.
#[Scalar(name = "JSON")]
impl ScalarType for JsonRow {
    fn parse(value: async_graphql::Value) -> InputValueResult<Self> {
        Ok(JsonRow(value))
    }

    fn to_value(&self) -> async_graphql::Value {
        self.0.clone()
    }
}

/// Cache facts about one answer.
#[derive(SimpleObject)]
pub struct CacheInfo {
    /// HIT, MISS or COALESCED.
    status: CacheStatus,
    /// True when the entry's fresh time has ended (or an invalidation made it
    /// stale) and it is served while one refresh runs; its status is HIT.
    stale: bool,
    /// Short hash of the cache key: equal for requests that share an entry.
    key: String,
    /// When the BI call that produced the rows ended (RFC 3339, UTC).
    produced_at: String,
    /// Seconds since the BI produced the rows.
    age_seconds: f64,
    /// Until when the entry is fresh (ISO-8601, UTC).
    fresh_until: String,
    /// Until when the entry may be served at all, stale after `freshUntil`
    /// (ISO-8601, UTC).
    stale_until: String,
    /// Seconds until the entry stops being fresh (0 once stale).
    expires_in_seconds: f64,
    /// The gateway instance whose BI call produced the rows.
    produced_by: String,
    /// Trace id of the BI call that produced the rows, when traces are exported.
    trace_id: Option<String>,
}

pub struct CatalogView(Arc<Catalog>);

#[Object(name = "Catalog")]
impl CatalogView {
    /// With BI_CUBES_FILE, only the cubes it lists: the others cannot be asked.
    async fn cubes(&self) -> Vec<CubeView<'_>> {
        self.0
            .meta()
            .cubes
            .iter()
            .filter(|cube| self.0.cubes().knows(&cube.name))
            .map(|cube| CubeView {
                catalog: &self.0,
                cube,
            })
            .collect()
    }
}

pub struct CubeView<'a> {
    catalog: &'a Catalog,
    cube: &'a crate::bi::protocol::MetaCube,
}

#[Object(name = "Cube")]
impl CubeView<'_> {
    async fn name(&self) -> &str {
        &self.cube.name
    }
    async fn title(&self) -> Option<&str> {
        self.cube.title.as_deref()
    }
    /// What `AggregateInput.measures` accepts.
    async fn measures(&self) -> Vec<MemberView<'_>> {
        self.cube.measures.iter().map(MemberView).collect()
    }
    /// What `AggregateInput.dimensions` accepts: the dimensions to group by.
    /// Time dimensions are not among them (see `timeDimensions`).
    async fn dimensions(&self) -> Vec<MemberView<'_>> {
        self.cube
            .dimensions
            .iter()
            .filter(|d| !self.catalog.is_time_dimension(&d.name))
            .map(MemberView)
            .collect()
    }
    /// Time dimensions (type `time`, and the cubes' mapped ones): refused in
    /// `dimensions` and `filters`. `dateRange` filters on the time dimension
    /// of the query's measures (`timeDimension`) and `granularity` buckets it.
    async fn time_dimensions(&self) -> Vec<MemberView<'_>> {
        self.cube
            .dimensions
            .iter()
            .filter(|d| self.catalog.is_time_dimension(&d.name))
            .map(MemberView)
            .collect()
    }
    /// The time dimension that `dateRange` and `granularity` apply to when
    /// this cube's measures are asked (`null`: its measures cannot be asked).
    async fn time_dimension(&self) -> Option<String> {
        self.catalog
            .cubes()
            .get(&self.cube.name)
            .and_then(|members| members.time_dimension)
            .map(|member| member.as_str().to_owned())
    }
    /// Whether the cube holds customers' data: every query that touches it
    /// carries the gateway's filter on its customer member.
    async fn tenant_scoped(&self) -> bool {
        self.catalog
            .cubes()
            .get(&self.cube.name)
            .is_some_and(|members| members.customer_member.is_some())
    }
}

pub struct MemberView<'a>(&'a MetaMember);

#[Object(name = "CubeMember")]
impl MemberView<'_> {
    /// The name to use in `measures` or `dimensions`, like `Sales.revenue`.
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn title(&self) -> Option<&str> {
        self.0.title.as_deref()
    }
    /// The BI's type: number, string, time, ...
    #[graphql(name = "type")]
    async fn kind(&self) -> Option<&str> {
        self.0.kind.as_deref()
    }
}
