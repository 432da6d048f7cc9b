package main

import (
	"fmt"
	"strconv"
	"strings"
)

// byteSize is a flag value of a number of bytes, written as a number with an
// optional unit: 512MiB, 2GiB, 1.5G, 64KB or 4096.
type byteSize int64

var byteUnits = []struct {
	suffix string
	mult   float64
}{
	{"KIB", 1 << 10}, {"MIB", 1 << 20}, {"GIB", 1 << 30}, {"TIB", 1 << 40},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40},
	{"B", 1},
}

func (b *byteSize) Set(s string) error {
	num, mult := strings.ToUpper(strings.TrimSpace(s)), 1.0
	for _, u := range byteUnits {
		if strings.HasSuffix(num, u.suffix) {
			num, mult = strings.TrimSpace(strings.TrimSuffix(num, u.suffix)), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 || f*mult > 1<<62 {
		return fmt.Errorf("%q is not a size: write a number of bytes with an optional unit, such as 512MiB or 2GiB", s)
	}
	*b = byteSize(f * mult)
	return nil
}

func (b *byteSize) String() string {
	v := int64(*b)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if v >= u.mult && v%u.mult == 0 {
			return strconv.FormatInt(v/u.mult, 10) + u.suffix
		}
	}
	return strconv.FormatInt(v, 10)
}

func (b *byteSize) Get() any { return int64(*b) }

// memorySizes fills in the defaults of --cache-size (512MiB) and
// --memory-limit (twice the cache plus 512MiB), 0 meaning the default.
func memorySizes(cache, limit byteSize) (byteSize, byteSize) {
	if cache == 0 {
		cache = 512 << 20
	}
	if limit == 0 {
		limit = 2*cache + 512<<20
	}
	return cache, limit
}
