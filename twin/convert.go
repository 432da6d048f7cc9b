package twin

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// convertStore brings a store of an older format to formatVersion, once, at
// Open, before anything is loaded; f is the format the store records. The
// format key is written last, so a process that dies while converting
// leaves a store of the old format, which the next Open converts again:
// each step is idempotent (a value already converted is skipped), and
// the readers accept both encodings meanwhile.
//
// Format 1 stored JSON values; format 2 stores the binary encoding of
// storecodec.go; format 3 is format 2 whose watch log may hold changes
// (logchain.go), which a build of format 2 would misread: a store of
// format 2 becomes format 3 as it is.
func convertStore(db *pebble.DB, f storeFormat, log *slog.Logger) error {
	switch f.Format {
	case formatVersion:
		return nil
	case 2:
		f.Format = formatVersion
		b, err := json.Marshal(f)
		if err != nil {
			return err
		}
		if err := db.Set(keyFormat, b, pebble.Sync); err != nil {
			return fmt.Errorf("twin: record the store format: %w", err)
		}
		log.Info("the store's format is now 3: its watch log may hold changes, and older builds refuse it")
		return nil
	case 1:
	default:
		return fmt.Errorf("twin: store format %d is not supported (this build reads formats 1 to %d; a newer twind wrote it?)", f.Format, formatVersion)
	}
	start := time.Now()
	log.Info("converting the store to a new format; this happens once", "from", f.Format, "to", formatVersion)
	var st convertStats
	if err := st.values(db, f.VShards); err != nil {
		return fmt.Errorf("twin: convert the store from format %d to %d (run `twind check` on it): %w", f.Format, formatVersion, err)
	}
	f.Format = formatVersion
	b, err := json.Marshal(f)
	if err != nil {
		return err
	}
	// After every converted value in the WAL: once it is durable, so
	// are they.
	if err := db.Set(keyFormat, b, pebble.Sync); err != nil {
		return fmt.Errorf("twin: record the store format: %w", err)
	}
	log.Info("converted the store", "format", formatVersion, "values", st.converted, "bytes_before", st.before, "bytes_after", st.after, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// Bounds of one conversion batch: the keys it reads and the bytes it
// writes. Tests lower them.
var (
	convertBatchKeys  = 4096
	convertBatchBytes = 4 << 20
	// convertBatchDone, if set, is called after each batch that wrote
	// something is applied: tests crash the store there.
	convertBatchDone func()
)

// convertStats counts what a conversion did.
type convertStats struct {
	converted     int
	before, after int64
}

// values converts every JSON value of format 1 to the binary encoding: the
// watch log, then each virtual shard's twin records, commands and rule
// states (history entries and presence marks hold no JSON).
func (st *convertStats) values(db *pebble.DB, vshards int) error {
	if err := st.span(db, prefixLog, prefixEnd(prefixLog), convertEvent); err != nil {
		return err
	}
	for vs := range vshards {
		for _, s := range []struct {
			section byte
			conv    func([]byte) ([]byte, error)
		}{
			{'t', convertRecord},
			{'c', convertCommand},
			{'x', convertRuleState},
		} {
			lower := shardPrefix(uint16(vs), s.section)
			if err := st.span(db, lower, prefixEnd(lower), s.conv); err != nil {
				return err
			}
		}
	}
	return nil
}

// span converts the values of the keys in [lower, upper), in batches of at
// most convertBatchKeys keys and about convertBatchBytes bytes, each read
// by an iterator of its own so that none pins the store for long.
func (st *convertStats) span(db *pebble.DB, lower, upper []byte, conv func([]byte) ([]byte, error)) error {
	for lower != nil {
		it, err := db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
		if err != nil {
			return err
		}
		b := db.NewBatch()
		next, err := st.batch(it, b, conv)
		err = errors.Join(err, it.Close())
		wrote := !b.Empty()
		if err == nil && wrote {
			// Synced, so that a process that keeps dying still makes
			// progress (a batch lost in a crash would only be converted
			// again: its values are still JSON).
			err = b.Commit(pebble.Sync)
		}
		b.Close()
		if err != nil {
			return err
		}
		if wrote && convertBatchDone != nil {
			convertBatchDone()
		}
		lower = next
	}
	return nil
}

// batch adds the conversions of one batch to b and returns the key to
// continue from, or nil at the end. The batch's values are converted on
// every core: decoding JSON is most of the work.
func (st *convertStats) batch(it *pebble.Iterator, b *pebble.Batch, conv func([]byte) ([]byte, error)) ([]byte, error) {
	type item struct {
		key, value, out []byte
		err             error
	}
	var items []item
	var next []byte
	n, size := 0, 0
	for valid := it.First(); valid; valid = it.Next() {
		if n >= convertBatchKeys || size >= convertBatchBytes {
			next = append([]byte(nil), it.Key()...)
			break
		}
		n++
		v, err := it.ValueAndErr()
		if err != nil {
			return nil, err
		}
		if isBinary(v) {
			continue // converted before a crash
		}
		if k := it.Key(); k[0] == 's' && k[5] == 't' && isSubKey(k[len(shardPrefix(0, 't')):]) {
			continue // a twin's seen key: 8 bytes, not JSON
		}
		items = append(items, item{key: append([]byte(nil), it.Key()...), value: append([]byte(nil), v...)})
		size += len(v)
	}
	if err := it.Error(); err != nil {
		return nil, err
	}
	workers := min(runtime.GOMAXPROCS(0), len(items))
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := w; i < len(items); i += workers {
				items[i].out, items[i].err = conv(items[i].value)
			}
		})
	}
	wg.Wait()
	for _, x := range items {
		if x.err != nil {
			return nil, fmt.Errorf("key %s: %w", keyString(x.key), x.err)
		}
		if err := b.Set(x.key, x.out, nil); err != nil {
			return nil, err
		}
		st.converted++
		st.before += int64(len(x.value))
		st.after += int64(len(x.out))
	}
	return next, nil
}

func convertRecord(v []byte) ([]byte, error) {
	r, err := decodeRecordJSON(v)
	if err != nil {
		return nil, err
	}
	return encodeRecord(r), nil
}

func convertEvent(v []byte) ([]byte, error) {
	ev, err := decodeEventJSON(v)
	if err != nil {
		return nil, err
	}
	var tw []byte
	if ev.Twin != nil {
		tw = appendTwin(nil, ev.Twin)
	}
	return appendEvent(nil, ev, tw), nil
}

func convertCommand(v []byte) ([]byte, error) {
	c, err := decodeCommandJSON(v)
	if err != nil {
		return nil, err
	}
	return encodeCommand(c)
}

func convertRuleState(v []byte) ([]byte, error) {
	s, err := decodeRuleStateJSON(v)
	if err != nil {
		return nil, err
	}
	return encodeRuleState(&s)
}
