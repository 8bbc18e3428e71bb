//! The unit of work for one model: its identity map and its pending
//! inserts and deletes, and how they become batched statements.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BufMut;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::Row;

use crate::engine::Executor;
use crate::error::{Error, Result};
use crate::identity::Identities;
use crate::model::{Model, TableDef};
use crate::query::Pending;
use crate::sql::{
    BinaryOp, CachedSql, ColumnRef, CopyInStatement, DeleteStatement, Expr, InsertSource, InsertStatement, ParamValue,
    ReserveKeysStatement, SqlCache, Statement, UnnestSource, UpdateStatement,
};
use crate::tracked::{
    block_of_one, handles, new_block, track_one, Block, Data, ObjectStatus, Owner, Tracked, MAX_BLOCK,
};

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The alias of the `unnest` rows in batched statements.
const ROWS: &str = "orm_rows";
/// The ordinal column of those rows.
const ORDINAL: &str = "orm_ordinal";

/// What the session needs from a model's unit of work without knowing the model.
pub(crate) trait TableUnit: Send + Sync {
    fn table(&self) -> &'static TableDef;
    fn has_changes(&self) -> bool;
    /// Works out the updates a flush will send, refusing changes no
    /// statement can carry (a changed primary key, an object still
    /// borrowed) before the flush sends anything.
    fn plan_updates(&mut self) -> Result<()>;
    fn flush_inserts<'a>(&'a mut self, exec: &'a Executor<'a>, cache: &'a SqlCache) -> BoxFuture<'a, Result<()>>;
    fn flush_updates<'a>(&'a mut self, exec: &'a Executor<'a>, cache: &'a SqlCache) -> BoxFuture<'a, Result<()>>;
    fn flush_deletes<'a>(&'a mut self, exec: &'a Executor<'a>, cache: &'a SqlCache) -> BoxFuture<'a, Result<()>>;
    /// After a commit: optionally mark every object expired.
    fn after_commit(&mut self, expire: bool);
    /// After a rollback or close: forget everything, detaching the objects.
    fn discard(&mut self);
    // Not upcasts to `dyn Any`: those need Rust 1.86, and the crate
    // supports 1.85.
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

pub(crate) struct TableState<M: Model> {
    pub(crate) identity: Identities<M>,
    pub(crate) new: Vec<Tracked<M>>,
    pub(crate) deleted: Vec<(M::PrimaryKey, Tracked<M>)>,
    /// Objects whose rows a flush of the open transaction deleted: a
    /// rollback brings the rows back and detaches these objects.
    pub(crate) flushed_deletes: Vec<Tracked<M>>,
    /// The updates `plan_updates` worked out for the flush under way.
    #[allow(clippy::type_complexity)]
    planned_updates: Option<BTreeMap<Vec<usize>, Vec<(Tracked<M>, u32)>>>,
    /// Shared with every object tracked here; see [`Owner`].
    pub(crate) owner: Arc<Owner>,
    /// The room the last load held rows back in, emptied, for the next
    /// load to reuse: a session making many small loads (gets) allocates
    /// it once.
    pub(crate) spare_rows: FreshRows<M>,
    /// The emptied list a `get`'s object came back in, for the next `get`.
    pub(crate) spare_found: Vec<Tracked<M>>,
    /// The text of a `get`'s statement, once the session has run one.
    pub(crate) get_sql: Option<CachedSql>,
}

impl<M: Model> Default for TableState<M> {
    fn default() -> Self {
        TableState {
            identity: Identities::default(),
            new: Vec::new(),
            deleted: Vec::new(),
            flushed_deletes: Vec::new(),
            planned_updates: None,
            owner: Owner::new(),
            spare_rows: FreshRows::default(),
            spare_found: Vec::new(),
            get_sql: None,
        }
    }
}

impl<M: Model> Drop for TableState<M> {
    fn drop(&mut self) {
        // Handles outliving the session are detached, as after close().
        self.owner.release();
    }
}

impl<M: Model> TableState<M> {
    /// Starts tracking a new object.
    pub(crate) fn track(&self, value: M, status: ObjectStatus) -> Tracked<M> {
        track_one(value, status, &self.owner)
    }

    /// Starts tracking new objects, a block at a time.
    pub(crate) fn track_all(&mut self, values: impl Iterator<Item = M>, status: ObjectStatus) -> Vec<Tracked<M>> {
        let mut values = values.peekable();
        let mut tracked = Vec::with_capacity(values.size_hint().0);
        let mut block = Vec::with_capacity(tracked.capacity().min(MAX_BLOCK));
        while values.peek().is_some() {
            block.extend(values.by_ref().take(MAX_BLOCK));
            tracked.extend(handles(&new_block(block.drain(..), status, &self.owner)));
        }
        tracked
    }

    /// Whether any object of this model is in the identity map or marked
    /// for deletion.
    pub(crate) fn has_objects(&self) -> bool {
        !self.identity.is_empty() || !self.deleted.is_empty()
    }

    /// The session's object for a loaded row's key, if it has one. An object
    /// marked for deletion but not flushed yet (autoflush off) is still the
    /// session's one object for the row.
    pub(crate) fn known(&mut self, key: &M::PrimaryKey) -> Option<Tracked<M>> {
        self.deleted_object(key).or_else(|| self.identity.get(key))
    }

    /// The object for `key` among those marked for deletion.
    fn deleted_object(&self, key: &M::PrimaryKey) -> Option<Tracked<M>> {
        if self.deleted.is_empty() {
            return None;
        }
        self.deleted
            .iter()
            .find(|(deleted, _)| deleted == key)
            .map(|(_, deleted)| deleted.clone())
    }

    /// The object for the model's columns from `offset` on in a loaded row:
    /// the session's object for the row's key, or a new one put in the
    /// identity map. Only the key is decoded when the session's object needs
    /// nothing from the row.
    pub(crate) fn merge_row(&mut self, row: &Row, offset: usize) -> Result<Tracked<M>> {
        let key = M::primary_key_at(row, offset)?;
        if let Some(deleted) = self.deleted_object(&key) {
            return merge_known(deleted, row, offset);
        }
        let owner = &self.owner;
        let (object, known) = self.identity.get_or_insert_with(key, |key| {
            let value = M::from_row_with_key(row, offset, key.clone())?;
            Ok(track_one(value, ObjectStatus::Persistent, owner))
        })?;
        if known {
            merge_known(object, row, offset)
        } else {
            Ok(object)
        }
    }

    /// For a model of a join: the session's object for `key`, the row's,
    /// with the row merged into it, or else the place of the row's new
    /// object in the block being gathered, its value held back in
    /// `gathered`. The rest of the row is decoded only when the session's
    /// object needs it.
    #[inline(always)]
    pub(crate) fn gather_row(
        &mut self,
        key: M::PrimaryKey,
        gathered: &mut Vec<M>,
        row: &Row,
        offset: usize,
    ) -> Result<Pending<Tracked<M>>> {
        if let Some(deleted) = self.deleted_object(&key) {
            return Ok(Pending::Ready(merge_known(deleted, row, offset)?));
        }
        // The key is cloned for a new object only (where it replaces decoding
        // the key's columns again), not for a row of a known one.
        let found = self.identity.get_or_gather(key, |key| {
            gathered.push(M::from_row_with_key(row, offset, key.clone())?);
            Ok(())
        })?;
        match found {
            Pending::Ready(known) => Ok(Pending::Ready(merge_known(known, row, offset)?)),
            gathering => Ok(gathering),
        }
    }

    /// Tracks the values [`gather_row`](Self::gather_row) held back in one
    /// block, at the place their keys name, and returns it (none if there
    /// were none).
    pub(crate) fn finish_gathering(&mut self, gathered: &mut Vec<M>) -> Option<Block<M>> {
        if gathered.is_empty() {
            return None;
        }
        let block = new_block(gathered.drain(..), ObjectStatus::Persistent, &self.owner);
        self.identity.finish_gathering(block.clone());
        Some(block)
    }

    /// The session's object for `key`, with the row (the model's columns
    /// from `offset` on) merged into it, if the session has one.
    pub(crate) fn merge_if_known(
        &mut self,
        key: &M::PrimaryKey,
        row: &Row,
        offset: usize,
    ) -> Result<Option<Tracked<M>>> {
        self.known(key).map(|known| merge_known(known, row, offset)).transpose()
    }

    /// Tracks the held-back rows of a load in one block, puts them in the
    /// identity map (`unindexed`: without hashing their keys, which the
    /// caller knows to be new and distinct) and appends their objects to
    /// `out`.
    pub(crate) fn track_fresh(&mut self, fresh: &mut FreshRows<M>, unindexed: bool, out: &mut Vec<Tracked<M>>) {
        if let Some((key, value)) = fresh.only.take() {
            let block = block_of_one(value, ObjectStatus::Persistent, &self.owner);
            self.keep_fresh(block, std::iter::once(key), unindexed, out);
        } else if !fresh.values.is_empty() {
            let block = new_block(fresh.values.drain(..), ObjectStatus::Persistent, &self.owner);
            self.keep_fresh(block, fresh.keys.drain(..), unindexed, out);
        }
    }

    /// Puts a block of newly loaded objects, the i-th under the i-th of
    /// `keys`, in the identity map, and appends them to `out`.
    fn keep_fresh(
        &mut self,
        block: Block<M>,
        keys: impl Iterator<Item = M::PrimaryKey>,
        unindexed: bool,
        out: &mut Vec<Tracked<M>>,
    ) {
        if unindexed {
            out.extend(handles(&block));
            self.identity.insert_unindexed(keys, block);
        } else {
            self.identity.make_room(block.len());
            // A key repeated among the held-back rows gives the first row's
            // object for both, as it would have row by row.
            self.identity.insert_block(keys, block, out);
        }
    }

    /// Changed columns of every persistent object with changes, grouped by
    /// the set of changed columns, so each group is one UPDATE; each object
    /// with the version its changes were read at.
    #[allow(clippy::type_complexity)]
    fn dirty_groups(&self) -> Result<BTreeMap<Vec<usize>, Vec<(Tracked<M>, u32)>>> {
        let table = M::TABLE;
        let mut groups: BTreeMap<Vec<usize>, Vec<(Tracked<M>, u32)>> = BTreeMap::new();
        // The changed columns of one object at a time; a list of its own is
        // made only for the first object of each group.
        let mut changed: Vec<usize> = Vec::new();
        for (key, tracked) in self.identity.iter() {
            let data = tracked.data()?;
            let Some(loaded) = &data.loaded else { continue };
            // Read under the lock: a write() needs it, so value and version agree.
            let version = tracked.version();
            let resend_all = tracked.meta().resend_all();
            changed.clear();
            changed
                .extend((0..table.columns.len()).filter(|&c| {
                    data.value.column_differs(loaded, c) || (resend_all && !table.columns[c].primary_key)
                }));
            drop(data);
            if changed.is_empty() {
                // Borrowed mutably but left as it was: nothing to send. While
                // the caller still reads it, or changed it since, the check
                // simply runs again later.
                match tracked.data_mut() {
                    Ok(mut data) if tracked.version() == version => {
                        data.loaded = None;
                        tracked.meta().set_resend_all(false);
                    }
                    _ => self.owner.dirty.store(true, Ordering::Release),
                }
                continue;
            }
            if let Some(&pk) = changed.iter().find(|&&c| table.columns[c].primary_key) {
                return Err(Error::InvalidState(format!(
                    "the primary key column {}.{} of the object with key {key:?} was changed; \
                     delete the object and add a new one instead",
                    table.name, table.columns[pk].name
                )));
            }
            let handle = (tracked.to_handle(), version);
            match groups.get_mut(changed.as_slice()) {
                Some(group) => group.push(handle),
                None => {
                    groups.insert(changed.clone(), vec![handle]);
                }
            }
        }
        Ok(groups)
    }
}

fn unnest<M: Model>(objects: &[&M], columns: &[usize], ordinality: bool) -> UnnestSource {
    let table = M::TABLE;
    UnnestSource {
        alias: ROWS,
        arrays: columns
            .iter()
            .map(|&c| {
                (
                    ParamValue::new(M::column_array(objects, c)),
                    table.columns[c].array_type,
                )
            })
            .collect(),
        columns: columns.iter().map(|&c| table.columns[c].name).collect(),
        ordinality: ordinality.then_some(ORDINAL),
    }
}

/// `"table"."pk" = "orm_rows"."pk" AND ...`
fn join_on_primary_key(table: &'static TableDef) -> Expr {
    Expr::And(
        table
            .primary_key
            .iter()
            .map(|&c| {
                let column = table.columns[c].name;
                Expr::Binary(
                    Box::new(Expr::Column(ColumnRef {
                        table: table.name,
                        column,
                    })),
                    BinaryOp::Eq,
                    Box::new(Expr::Column(ColumnRef { table: ROWS, column })),
                )
            })
            .collect(),
    )
}

/// Reads an integer column of any width, for ordering generated keys.
fn integer_at(row: &Row, index: usize) -> Option<i64> {
    let column_type = row.columns().get(index)?.type_();
    if *column_type == Type::INT2 {
        row.try_get::<_, i16>(index).ok().map(i64::from)
    } else if *column_type == Type::INT4 {
        row.try_get::<_, i32>(index).ok().map(i64::from)
    } else {
        row.try_get::<_, i64>(index).ok()
    }
}

impl<M: Model> TableState<M> {
    /// A new object with the key of an object deleted in the same flush
    /// becomes an UPDATE of that row (SQLAlchemy's "row switch"), instead of
    /// an INSERT that would run into the row the DELETE has not removed yet.
    /// Columns the new object leaves to the database keep the row's values.
    fn switch_rows(&mut self) -> Result<()> {
        let table = M::TABLE;
        let mut i = 0;
        while i < self.new.len() {
            let key = {
                let data = self.new[i].data()?;
                let key_unassigned = table.primary_key.iter().any(|&c| data.value.column_is_unset(c));
                (!key_unassigned).then(|| data.value.primary_key())
            };
            let Some(position) = key.and_then(|key| self.deleted.iter().position(|(deleted, _)| *deleted == key))
            else {
                i += 1;
                continue;
            };
            // Both objects' borrows are checked before any list changes: a
            // flush refused because either is borrowed leaves every list as
            // it was, for the next flush to switch the row.
            let row = {
                let data = self.deleted[position].1.data()?;
                data.stored().clone()
            };
            {
                let object = &self.new[i];
                let mut data = object.data_mut()?;
                for column in 0..table.columns.len() {
                    if data.value.column_is_unset(column) {
                        data.value.copy_column(&row, column);
                    }
                }
                data.loaded = Some(Box::new(row));
                // Under the value's lock, as in `mark_inserted_locked`.
                object.meta().set_status(ObjectStatus::Persistent);
            }
            let (key, old) = self.deleted.remove(position);
            old.meta().set_final_status(ObjectStatus::Detached);
            let object = self.new.remove(i);
            self.owner.dirty.store(true, Ordering::Release);
            self.identity.insert(key, &object);
        }
        Ok(())
    }

    /// Marks an object whose statement succeeded as matching the database,
    /// unless it was changed while the statement was in flight (from another
    /// task holding a handle): then which values the database got is unknown,
    /// and the object is left for the next flush to send in full.
    fn settle(&self, object: &Tracked<M>, version_sent: u32) -> Result<()> {
        settle_locked(&self.owner, object, &mut *object.data_mut()?, version_sent);
        Ok(())
    }
}

/// The part of a model's state that inserting its new objects changes: the
/// identity map, and the owner, whose dirty flag an object changed while its
/// statement was in flight raises. Borrowed apart from the list of new
/// objects, which stays whole while they go in: a flush that fails or is
/// cancelled half-way leaves every object listed, for the rollback that must
/// follow to detach.
struct Inserting<'a, M: Model> {
    identity: &'a mut Identities<M>,
    owner: &'a Owner,
}

impl<M: Model> Inserting<'_, M> {
    /// Inserts `new` (the objects added since the last flush): objects whose
    /// unset columns differ need different column lists, so one statement
    /// per distinct list, objects keeping their order.
    async fn insert_all(&mut self, exec: &Executor<'_>, cache: &SqlCache, new: &[Tracked<M>]) -> Result<()> {
        let mut groups: Vec<(Vec<usize>, Vec<&Tracked<M>>)> = Vec::new();
        let columns = M::TABLE.columns.len();
        let mut omitted = Vec::new();
        for object in new {
            omitted.clear();
            {
                let data = object.data()?;
                omitted.extend((0..columns).filter(|&c| data.value.column_is_unset(c)));
            }
            // Compared element by element: the slices are short, often
            // empty, and libc's memcmp of an empty slice was measured at a
            // tenth of a large flush's time.
            match groups.iter_mut().find(|(key, _)| key.iter().eq(omitted.iter())) {
                Some((_, members)) => members.push(object),
                None => groups.push((omitted.clone(), vec![object])),
            }
        }
        for (omitted, objects) in groups {
            self.insert_group(exec, cache, omitted, objects).await?;
        }
        Ok(())
    }

    async fn insert_group(
        &mut self,
        exec: &Executor<'_>,
        cache: &SqlCache,
        omitted: Vec<usize>,
        objects: Vec<&Tracked<M>>,
    ) -> Result<()> {
        let table = M::TABLE;
        let explicit: Vec<usize> = (0..table.columns.len()).filter(|c| !omitted.contains(c)).collect();
        let identity = table.identity_column().filter(|c| omitted.contains(c));
        // Returned rows are matched to objects by the generated identity
        // value, or else by the primary key, so RETURNING carries the key.
        let mut returning: Vec<usize> = omitted.clone();
        if !omitted.is_empty() && identity.is_none() {
            returning.extend(table.primary_key.iter().copied().filter(|c| !omitted.contains(c)));
        }
        let returning_names: Vec<&'static str> = returning.iter().map(|&c| table.columns[c].name).collect();

        let versions: Vec<u32> = objects.iter().map(|object| object.version()).collect();
        if explicit.is_empty() {
            // Every column comes from a default: one DEFAULT VALUES row each.
            for object in &objects {
                let writer = InsertStatement {
                    table: table.name,
                    columns: Vec::new(),
                    source: InsertSource::DefaultValues,
                    returning: returning_names.clone(),
                }
                .cached(cache);
                let rows = exec.query(&writer).await?;
                let row = rows.first().ok_or_else(|| Error::NotFound {
                    table: table.name.to_owned(),
                })?;
                object.data_mut()?.value.set_from_row(row, &returning)?;
            }
            return self.mark_inserted(&objects, &versions);
        }

        if objects.len() >= COPY_THRESHOLD {
            if let Some(types) = binary_copy_types(table) {
                if omitted.is_empty() {
                    return self.copy_group(exec, cache, None, objects, &types, &versions).await;
                }
                if let Some(column) = identity.filter(|&c| omitted == [c]) {
                    if let Some(keys) = reserve_keys(exec, cache, table, column, objects.len()).await? {
                        return self
                            .copy_group(exec, cache, Some((column, keys)), objects, &types, &versions)
                            .await;
                    }
                    // No sequence this role may take values from: the
                    // INSERT below has the database assign the keys.
                }
            }
        }

        // A lone object with the type of each value, read off its array type
        // ("text[]" gives "text").
        let single_row = match objects.as_slice() {
            [object] => explicit
                .iter()
                .map(|&c| table.columns[c].array_type.strip_suffix("[]"))
                .collect::<Option<Vec<&'static str>>>()
                .map(|scalar_types| (object, scalar_types)),
            _ => None,
        };
        let source = if let Some((object, scalar_types)) = single_row {
            // One object: a VALUES row, which PostgreSQL plans and runs
            // faster than unnest (a third faster right after the table's
            // plans were invalidated).
            let data = object.data()?;
            InsertSource::Values(
                explicit
                    .iter()
                    .zip(scalar_types)
                    .map(|(&c, scalar_type)| (ParamValue::new(data.value.column_param(c)), scalar_type))
                    .collect(),
            )
        } else {
            let states = objects.iter().map(|object| object.data()).collect::<Result<Vec<_>>>()?;
            let values: Vec<&M> = states.iter().map(|s| &s.value).collect();
            InsertSource::Unnest(unnest(&values, &explicit, identity.is_some()))
        };
        let writer = InsertStatement {
            table: table.name,
            columns: explicit.iter().map(|&c| table.columns[c].name).collect(),
            source,
            returning: returning_names,
        }
        .cached(cache);

        if returning.is_empty() {
            let inserted = exec.execute(&writer).await?;
            check_count(table, "insert", objects.len(), inserted)?;
            return self.mark_inserted(&objects, &versions);
        }

        let rows = exec.query(&writer).await?;
        check_count(table, "insert", objects.len(), rows.len() as u64)?;
        if let Some(identity) = identity {
            // Rows were inserted in the objects' order (ORDER BY ordinal), and
            // identity values grow in insertion order: sorting the returned
            // rows by the generated key lines them up with the objects.
            let position = returning.iter().position(|&c| c == identity).unwrap_or(0);
            let mut keyed: Vec<(i64, &Row)> = rows
                .iter()
                .map(|row| (integer_at(row, position).unwrap_or(i64::MAX), row))
                .collect();
            keyed.sort_by_key(|(key, _)| *key);
            for ((object, (_, row)), &version) in objects.iter().zip(keyed).zip(&versions) {
                let mut data = object.data_mut()?;
                data.value.set_from_row(row, &returning)?;
                self.mark_inserted_locked(object, &mut data, version);
            }
            return Ok(());
        } else {
            let mut index: HashMap<M::PrimaryKey, usize> = HashMap::with_capacity(objects.len());
            for (i, object) in objects.iter().enumerate() {
                index.insert(object.data()?.value.primary_key(), i);
            }
            let mut probe = objects[0].data()?.value.clone();
            for row in &rows {
                probe.set_from_row(row, &returning)?;
                let &i = index.get(&probe.primary_key()).ok_or_else(|| {
                    Error::InvalidState(format!("{} returned a key the session did not insert", table.name))
                })?;
                objects[i].data_mut()?.value.set_from_row(row, &returning)?;
            }
        }
        self.mark_inserted(&objects, &versions)
    }

    /// Inserts a large group by binary COPY; with `keys`, the column at that
    /// position takes the reserved keys, ascending in the objects' order.
    /// The objects receive their keys only once every row is in, and all at
    /// once: none if any is still borrowed elsewhere.
    async fn copy_group(
        &mut self,
        exec: &Executor<'_>,
        cache: &SqlCache,
        keys: Option<(usize, Vec<i64>)>,
        objects: Vec<&Tracked<M>>,
        types: &[Type],
        versions: &[u32],
    ) -> Result<()> {
        let table = M::TABLE;
        let keys = keys.as_ref().map(|(column, keys)| (*column, keys.as_slice()));
        let copied = copy_in(exec, cache, &objects, types, keys).await?;
        check_count(table, "insert", objects.len(), copied)?;
        let Some((column, keys)) = keys else {
            return self.mark_inserted(&objects, versions);
        };
        let mut states = objects
            .iter()
            .map(|object| object.data_mut())
            .collect::<Result<Vec<_>>>()?;
        for (state, &key) in states.iter_mut().zip(keys) {
            if !state.value.assign_key(column, key) {
                return Err(Error::InvalidState(format!(
                    "key {key} from the sequence of {}.{} does not fit the field",
                    table.name, table.columns[column].name
                )));
            }
        }
        let mut keys = Vec::with_capacity(objects.len());
        for ((object, state), &version) in objects.iter().zip(&mut states).zip(versions) {
            keys.push(mark_persistent(self.owner, object, state, version));
        }
        self.enter_inserted(&objects, keys);
        Ok(())
    }

    fn mark_inserted(&mut self, objects: &[&Tracked<M>], versions: &[u32]) -> Result<()> {
        let mut keys = Vec::with_capacity(objects.len());
        let mut result = Ok(());
        for (object, &version) in objects.iter().zip(versions) {
            match object.data_mut() {
                Ok(mut data) => keys.push(mark_persistent(self.owner, object, &mut data, version)),
                Err(error) => {
                    result = Err(error);
                    break;
                }
            }
        }
        // Those marked persistent go in the map even if one could not be.
        self.enter_inserted(&objects[..keys.len()], keys);
        result
    }

    /// Puts newly inserted objects in the identity map, the i-th under
    /// `keys[i]`. Into an empty map, keys that ascend and objects that fill
    /// their blocks in order (as `add_all` made them) go in unindexed, as a
    /// load in key order does: a large insert then hashes no key unless the
    /// session looks one up.
    fn enter_inserted(&mut self, objects: &[&Tracked<M>], keys: Vec<M::PrimaryKey>) {
        debug_assert_eq!(objects.len(), keys.len());
        let ascending = keys.windows(2).all(|pair| pair[0] < pair[1]);
        if ascending && self.identity.is_empty() {
            if let Some(blocks) = whole_blocks(objects) {
                let mut keys = keys.into_iter();
                for block in blocks {
                    let len = block.len();
                    self.identity.insert_unindexed(keys.by_ref().take(len), block);
                }
                return;
            }
        }
        self.identity.make_room(objects.len());
        for (object, key) in objects.iter().zip(keys) {
            enter_one(self.identity, key, object);
        }
    }

    /// Marks an inserted object persistent and puts it in the identity map,
    /// while the caller holds its value locked: a `write()` racing with the
    /// flush then sees the object either pending or persistent with its
    /// value settled, never persistent before the value is.
    fn mark_inserted_locked(&mut self, object: &Tracked<M>, data: &mut Data<M>, version: u32) {
        let key = mark_persistent(self.owner, object, data, version);
        enter_one(self.identity, key, object);
    }
}

/// Marks an inserted object persistent, while the caller holds its value
/// locked (see [`Inserting::mark_inserted_locked`]), and returns its key.
fn mark_persistent<M: Model>(owner: &Owner, object: &Tracked<M>, data: &mut Data<M>, version: u32) -> M::PrimaryKey {
    settle_locked(owner, object, data, version);
    object.meta().set_status(ObjectStatus::Persistent);
    data.value.primary_key()
}

/// Puts one inserted object in the identity map under `key`.
fn enter_one<M: Model>(identity: &mut Identities<M>, key: M::PrimaryKey, object: &Tracked<M>) {
    if let Some(previous) = identity.insert(key, object) {
        // The row that object stood for was deleted behind the session's
        // back; the new row replaces it.
        previous.meta().set_final_status(ObjectStatus::Detached);
    }
}

/// The blocks of `objects`, if they are every object of each block, in
/// block order and each block's own order.
fn whole_blocks<M>(objects: &[&Tracked<M>]) -> Option<Vec<Block<M>>> {
    let mut blocks = Vec::new();
    let mut rest = objects;
    while let Some(first) = rest.first() {
        let (block, 0) = first.place() else { return None };
        let len = block.len();
        let run = rest.get(..len)?;
        if !(0..).zip(run).all(|(index, object)| object.is_in(block, index)) {
            return None;
        }
        blocks.push(block.clone());
        rest = &rest[len..];
    }
    Some(blocks)
}

/// [`TableState::settle`], for a caller that holds the value already.
fn settle_locked<M: Model>(owner: &Owner, object: &Tracked<M>, data: &mut Data<M>, version_sent: u32) {
    if object.version() == version_sent {
        data.loaded = None;
        object.meta().set_resend_all(false);
    } else {
        data.loaded = Some(Box::new(data.value.clone()));
        object.meta().set_resend_all(true);
        owner.dirty.store(true, Ordering::Release);
    }
}

/// From this many new objects on, a group whose every column the objects
/// supply, or that leaves only the identity key to the database, goes in by
/// binary COPY (after reserving the keys, for the latter): more round trips
/// than one `INSERT ... SELECT`, but each row costs far less on the server.
const COPY_THRESHOLD: usize = 1_000;

/// Rows encoded between two sends of a binary COPY.
const COPY_CHUNK: usize = 1_024;

/// The exact PostgreSQL type of every column, which binary COPY needs; `None`
/// when a column has a type this table does not know (a user's own
/// `ColumnType`), and the group goes through `unnest` instead.
fn binary_copy_types(table: &'static TableDef) -> Option<Vec<Type>> {
    table
        .columns
        .iter()
        .map(|column| match (column.sql_type, column.length) {
            ("text", Some(_)) => Some(Type::VARCHAR),
            ("text", None) => Some(Type::TEXT),
            ("smallint", _) => Some(Type::INT2),
            ("integer", _) => Some(Type::INT4),
            ("bigint", _) => Some(Type::INT8),
            ("real", _) => Some(Type::FLOAT4),
            ("double precision", _) => Some(Type::FLOAT8),
            ("boolean", _) => Some(Type::BOOL),
            ("bytea", _) => Some(Type::BYTEA),
            _ => None,
        })
        .collect()
}

/// Streams `objects` into their table with binary COPY and returns how many
/// rows went in. See PostgreSQL's "COPY: binary format" for the layout.
///
/// With `keys`, the column at that position takes the i-th key for the i-th
/// object instead of the object's own value.
async fn copy_in<M: Model>(
    exec: &Executor<'_>,
    cache: &SqlCache,
    objects: &[&Tracked<M>],
    types: &[Type],
    keys: Option<(usize, &[i64])>,
) -> Result<u64> {
    let table = M::TABLE;
    let mut sql = String::new();
    cache.dialect().prepare_copy_in(
        &mut sql,
        &CopyInStatement {
            table: table.name,
            columns: table.columns.iter().map(|c| c.name).collect(),
        },
    );
    let field_count = i16::try_from(types.len())
        .map_err(|_| Error::InvalidState(format!("{} has too many columns for COPY", table.name)))?;
    let mut next = 0;
    exec.copy_in(&sql, |buffer| {
        if next == 0 {
            buffer.put_slice(b"PGCOPY\n\xff\r\n\0");
            buffer.put_i32(0); // flags
            buffer.put_i32(0); // header extension length
        }
        let end = (next + COPY_CHUNK).min(objects.len());
        for (index, object) in objects.iter().enumerate().take(end).skip(next) {
            let data = object.data()?;
            buffer.put_i16(field_count);
            for (column, column_type) in types.iter().enumerate() {
                let length_at = buffer.len();
                buffer.put_i32(0);
                let key = keys
                    .filter(|(key_column, _)| *key_column == column)
                    .map(|(_, keys)| keys[index]);
                let written = match key {
                    Some(key) => encode_key(key, column_type, buffer),
                    None => data.value.column_value(column).to_sql_checked(column_type, buffer),
                }
                .map_err(|e| {
                    Error::InvalidState(format!(
                        "the value of {}.{} cannot be encoded as {column_type}: {e}",
                        table.name, table.columns[column].name
                    ))
                })?;
                let length = match written {
                    IsNull::Yes => -1,
                    IsNull::No => i32::try_from(buffer.len() - length_at - 4).map_err(|_| {
                        Error::InvalidState(format!(
                            "a value of {}.{} is larger than PostgreSQL accepts",
                            table.name, table.columns[column].name
                        ))
                    })?,
                };
                buffer[length_at..length_at + 4].copy_from_slice(&length.to_be_bytes());
            }
        }
        next = end;
        if next == objects.len() {
            buffer.put_i16(-1); // trailer
            Ok(false)
        } else {
            Ok(true)
        }
    })
    .await
}

/// Takes `count` keys from the sequence behind `table`'s identity column,
/// ascending. `None` when there is no sequence this role may take values
/// from (`nextval` needs USAGE or UPDATE on it, where an `INSERT` needs
/// neither): the caller then lets `INSERT` assign the keys.
async fn reserve_keys(
    exec: &Executor<'_>,
    cache: &SqlCache,
    table: &'static TableDef,
    column: usize,
    count: usize,
) -> Result<Option<Vec<i64>>> {
    let mut quoted = String::new();
    cache.dialect().quote_identifier(&mut quoted, table.name);
    let reserve = ReserveKeysStatement {
        table: ParamValue::new(Box::new(quoted)),
        column: ParamValue::new(Box::new(table.columns[column].name.to_owned())),
        count: ParamValue::new(Box::new(count as i64)),
    }
    .cached(cache);
    let rows = exec.query(&reserve).await?;
    let keys: Option<Vec<i64>> = match rows.first() {
        Some(row) => row.try_get(0).map_err(|source| Error::TypeMismatch {
            table: table.name.to_owned(),
            column: table.columns[column].name.to_owned(),
            source,
        })?,
        None => None,
    };
    let Some(mut keys) = keys else { return Ok(None) };
    check_count(table, "reserve keys for", count, keys.len() as u64)?;
    // Ascending, so objects get keys in the order they were added.
    keys.sort_unstable();
    Ok(Some(keys))
}

/// A reserved key in the identity column's own width. The sequence of an
/// identity column never exceeds its column's type, so narrowing cannot fail
/// for values it handed out.
fn encode_key(
    key: i64,
    column_type: &Type,
    buffer: &mut bytes::BytesMut,
) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
    if *column_type == Type::INT2 {
        i16::try_from(key)?.to_sql_checked(column_type, buffer)
    } else if *column_type == Type::INT4 {
        i32::try_from(key)?.to_sql_checked(column_type, buffer)
    } else {
        key.to_sql_checked(column_type, buffer)
    }
}

/// Merges a loaded row (the model's columns from `offset` on) into the
/// session's object for it. An expired persistent object takes the fresh
/// state; a live one keeps its own (it may hold unflushed changes), and the
/// row is not even decoded.
pub(crate) fn merge_known<M: Model>(existing: Tracked<M>, row: &Row, offset: usize) -> Result<Tracked<M>> {
    {
        let mut meta = existing.meta();
        if meta.is_expired() && meta.status() == ObjectStatus::Persistent {
            let value = M::from_row_at(row, offset)?;
            // If the caller still borrows the object, it stays expired
            // and is refreshed by a later load instead.
            if let Ok(mut data) = existing.data_mut() {
                let data = &mut *data;
                match data.loaded.take() {
                    // Unflushed changes survive: columns the caller changed
                    // keep the caller's value, the others take the fresh
                    // one, and the fresh state becomes the snapshot the
                    // next flush compares against.
                    Some(mut before) => {
                        for column in 0..M::TABLE.columns.len() {
                            if !data.value.column_differs(&before, column) {
                                data.value.copy_column(&value, column);
                            }
                        }
                        *before = value;
                        data.loaded = Some(before);
                    }
                    None => data.value = value,
                }
                meta.refresh();
            }
        }
    }
    Ok(existing)
}

/// Rows of a load whose objects the session does not know yet, held back so
/// that their objects are tracked a block at a time.
pub(crate) struct FreshRows<M: Model> {
    /// The row held back, while it is the only one and no room has been
    /// made yet: a load of one row (a `get`, a request's first query)
    /// allocates none.
    only: Option<(M::PrimaryKey, M)>,
    keys: Vec<M::PrimaryKey>,
    values: Vec<M>,
}

impl<M: Model> Default for FreshRows<M> {
    fn default() -> Self {
        FreshRows {
            only: None,
            keys: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl<M: Model> FreshRows<M> {
    /// The key of the row held back last.
    pub(crate) fn last_key(&self) -> Option<&M::PrimaryKey> {
        match &self.only {
            Some((key, _)) => Some(key),
            None => self.keys.last(),
        }
    }

    /// Holds a row back; true once a block's worth is waiting. Inlined, so
    /// the value is stored once, from registers: passed by reference, it
    /// was read back in wider pieces than it was written, which stalls.
    #[inline(always)]
    pub(crate) fn push(&mut self, key: M::PrimaryKey, value: M) -> bool {
        if self.values.len() == self.values.capacity() {
            if self.values.capacity() == 0 && self.only.is_none() {
                self.only = Some((key, value));
                return false;
            }
            self.grow();
        }
        self.keys.push(key);
        self.values.push(value);
        self.values.len() == MAX_BLOCK
    }

    /// Room for a few rows first, which is all a lookup by key needs (a
    /// block's worth is a large allocation, slow to make and to free), then
    /// for a whole block at once, rather than growing four more times. The
    /// row held back alone moves in first.
    #[cold]
    fn grow(&mut self) {
        let room = if self.values.capacity() == 0 {
            FEW_ROWS
        } else {
            MAX_BLOCK
        };
        self.values.reserve_exact(room - self.values.len());
        self.keys.reserve_exact(room - self.keys.len());
        if let Some((key, value)) = self.only.take() {
            self.keys.push(key);
            self.values.push(value);
        }
    }
}

/// The rows a load makes room for first: see [`FreshRows::grow`].
const FEW_ROWS: usize = 8;

fn check_count(table: &'static TableDef, operation: &'static str, expected: usize, actual: u64) -> Result<()> {
    if actual == expected as u64 {
        Ok(())
    } else {
        Err(Error::StaleData {
            table: table.name.to_owned(),
            operation,
            expected: expected as u64,
            actual,
        })
    }
}

impl<M: Model> TableUnit for TableState<M> {
    fn table(&self) -> &'static TableDef {
        M::TABLE
    }

    fn has_changes(&self) -> bool {
        !self.new.is_empty()
            || !self.deleted.is_empty()
            || self.planned_updates.is_some()
            || self.owner.dirty.load(Ordering::Acquire)
    }

    fn plan_updates(&mut self) -> Result<()> {
        // A row deleted and added again becomes an update: decided first, so
        // the plan includes it.
        if !self.deleted.is_empty() {
            self.switch_rows()?;
        }
        // A plan left by a flush refused further on is simply made again:
        // its objects still hold their snapshots.
        let left_over = self.planned_updates.take().is_some();
        if !self.owner.dirty.swap(false, Ordering::AcqRel) && !left_over {
            return Ok(());
        }
        match self.dirty_groups() {
            Ok(groups) => {
                self.planned_updates = Some(groups);
                Ok(())
            }
            Err(error) => {
                // Nothing was taken from the objects: the next flush looks again.
                self.owner.dirty.store(true, Ordering::Release);
                Err(error)
            }
        }
    }

    fn flush_inserts<'a>(&'a mut self, exec: &'a Executor<'a>, cache: &'a SqlCache) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if self.new.is_empty() {
                return Ok(());
            }
            // The list is emptied only once every group is in: after a failure
            // the objects are still listed, so a rollback detaches them all.
            let mut inserting = Inserting {
                identity: &mut self.identity,
                owner: &self.owner,
            };
            inserting.insert_all(exec, cache, &self.new).await?;
            self.new.clear();
            Ok(())
        })
    }

    fn flush_updates<'a>(&'a mut self, exec: &'a Executor<'a>, cache: &'a SqlCache) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let table = M::TABLE;
            let Some(planned) = self.planned_updates.take() else {
                return Ok(());
            };
            for (changed, objects) in planned {
                let (objects, versions): (Vec<Tracked<M>>, Vec<u32>) = objects.into_iter().unzip();
                let writer = {
                    let states = objects.iter().map(Tracked::data).collect::<Result<Vec<_>>>()?;
                    let values: Vec<&M> = states.iter().map(|s| &s.value).collect();
                    let columns: Vec<usize> = table.primary_key.iter().chain(&changed).copied().collect();
                    UpdateStatement {
                        table: table.name,
                        assignments: changed
                            .iter()
                            .map(|&c| {
                                let column = table.columns[c].name;
                                (column, Expr::Column(ColumnRef { table: ROWS, column }))
                            })
                            .collect(),
                        from: Some(unnest(&values, &columns, false)),
                        filter: Some(join_on_primary_key(table)),
                    }
                    .cached(cache)
                };
                let updated = exec.execute(&writer).await?;
                check_count(table, "update", objects.len(), updated)?;
                for (object, version) in objects.iter().zip(versions) {
                    self.settle(object, version)?;
                }
            }
            Ok(())
        })
    }

    fn flush_deletes<'a>(&'a mut self, exec: &'a Executor<'a>, cache: &'a SqlCache) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if self.deleted.is_empty() {
                return Ok(());
            }
            let table = M::TABLE;
            let deleted = &self.deleted;
            let writer = {
                let states = deleted.iter().map(|(_, o)| o.data()).collect::<Result<Vec<_>>>()?;
                // The key the row was loaded with, not a value edited since.
                let values: Vec<&M> = states.iter().map(|s| s.stored()).collect();
                DeleteStatement {
                    table: table.name,
                    using: Some(unnest(&values, table.primary_key, false)),
                    filter: Some(join_on_primary_key(table)),
                }
                .cached(cache)
            };
            let removed = exec.execute(&writer).await?;
            check_count(table, "delete", deleted.len(), removed)?;
            for (_, object) in std::mem::take(&mut self.deleted) {
                object.meta().set_status(ObjectStatus::Deleted);
                if let Ok(mut data) = object.data_mut() {
                    data.loaded = None;
                }
                self.flushed_deletes.push(object);
            }
            Ok(())
        })
    }

    fn after_commit(&mut self, expire: bool) {
        if expire {
            self.owner.expire_all();
        }
        // Their rows are gone for good; the objects stay Deleted, untracked.
        for object in self.flushed_deletes.drain(..) {
            object.meta().set_final_status(ObjectStatus::Deleted);
        }
    }

    fn discard(&mut self) {
        // Every object tracked here is detached by one store; a fresh owner
        // tracks whatever the session loads next.
        self.owner.release();
        *self = TableState::default();
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
