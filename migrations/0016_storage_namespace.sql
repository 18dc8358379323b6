-- Storage objects are named by bucket and path, as on Supabase and S3
-- (issue 15): the owner is recorded, not part of the key. The seed routes
-- keep a user's files under a folder named after the user id, so every
-- owned row moves to `<owner id>/<path>` unless it is already there (a
-- /storage/v1 upload that followed Supabase's `<user id>/…` convention).
-- A user's home folder (`<user id>`) has no row: what is directly in it has
-- folder_id / parent_id NULL, as a user's root always had.
--
-- Rows that then share a name are kept, none lost: folders are merged, and
-- of files the one whose owner's folder it is in (else the oldest) keeps the
-- name while the others get their id's first eight digits before the
-- extension (`docs/a.pdf` → `docs/a (1a2b3c4d).pdf`); so does a file where
-- a folder is.

DO $$
DECLARE c record;
BEGIN
    FOR c IN SELECT conrelid::regclass AS tbl, conname FROM pg_constraint
             WHERE contype = 'u'
               AND conrelid IN ('public.files'::regclass, 'public.folders'::regclass)
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.tbl, c.conname);
    END LOOP;
END
$$;

-- Whether `owner` is the user whose folder `path` is in.
CREATE FUNCTION pg_temp.in_own_home(path text, owner uuid) RETURNS boolean
    LANGUAGE sql IMMUTABLE
    AS $$ SELECT owner IS NOT NULL AND starts_with(path, owner::text || '/') $$;

CREATE FUNCTION pg_temp.suffixed(name text, id uuid) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$ SELECT regexp_replace(name, '(\.[^./]*)?$', ' (' || left(id::text, 8) || ')\1') $$;

UPDATE public.folders SET path = owner_id::text || '/' || path
WHERE owner_id IS NOT NULL AND path <> owner_id::text
  AND NOT starts_with(path, owner_id::text || '/');
UPDATE public.files SET path = owner_id::text || '/' || path
WHERE owner_id IS NOT NULL AND NOT starts_with(path, owner_id::text || '/');

-- Home folders have no row.
CREATE TEMP TABLE homes ON COMMIT DROP AS
SELECT id FROM public.folders
WHERE path ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$';
UPDATE public.files SET folder_id = NULL WHERE folder_id IN (SELECT id FROM homes);
UPDATE public.folders SET parent_id = NULL WHERE parent_id IN (SELECT id FROM homes);
DELETE FROM public.folders WHERE id IN (SELECT id FROM homes);

-- Folders of one name: one stays (its home's owner's, else the oldest).
CREATE TEMP TABLE folder_keep ON COMMIT DROP AS
SELECT id, first_value(id) OVER (
           PARTITION BY bucket_id, path
           ORDER BY pg_temp.in_own_home(path, owner_id) DESC, created_at, id) AS keep
FROM public.folders;
DELETE FROM folder_keep WHERE id = keep;
UPDATE public.files x SET folder_id = k.keep FROM folder_keep k WHERE x.folder_id = k.id;
UPDATE public.folders x SET parent_id = k.keep FROM folder_keep k WHERE x.parent_id = k.id;
DELETE FROM public.folders WHERE id IN (SELECT id FROM folder_keep);

-- Files of one name: one keeps it, the others are renamed.
CREATE TEMP TABLE file_rank ON COMMIT DROP AS
SELECT id, row_number() OVER (
           PARTITION BY bucket_id, path
           ORDER BY pg_temp.in_own_home(path, owner_id) DESC, created_at, id) AS n
FROM public.files;
UPDATE public.files x SET path = pg_temp.suffixed(x.path, x.id), name = pg_temp.suffixed(x.name, x.id)
FROM file_rank r WHERE r.id = x.id AND r.n > 1;

-- A file where a folder is (also a file named like a user's folder that
-- holds something) is renamed too.
UPDATE public.files x SET path = pg_temp.suffixed(x.path, x.id), name = pg_temp.suffixed(x.name, x.id)
WHERE EXISTS (SELECT 1 FROM public.folders f WHERE f.bucket_id = x.bucket_id AND f.path = x.path)
   OR (x.path ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
       AND (EXISTS (SELECT 1 FROM public.files y
                    WHERE y.bucket_id = x.bucket_id AND starts_with(y.path, x.path || '/'))
            OR EXISTS (SELECT 1 FROM public.folders y
                       WHERE y.bucket_id = x.bucket_id AND starts_with(y.path, x.path || '/'))));

-- One object per bucket and name.
ALTER TABLE public.files ADD CONSTRAINT files_bucket_id_path_key UNIQUE (bucket_id, path);
ALTER TABLE public.folders ADD CONSTRAINT folders_bucket_id_path_key UNIQUE (bucket_id, path);
