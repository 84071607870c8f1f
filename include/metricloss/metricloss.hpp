#pragma once
// The CPU umbrella: every loss with its scalar and SIMD backends. Never includes CUDA
// (that is <metricloss/cuda.cuh>, compiled by nvcc).
//
// Order: configuration and core types, then per loss its public functor followed by its
// backends (a backend specialises detail::Backend<Loss, Tag> declared in exec.hpp).
#include <metricloss/version.hpp>
#include <metricloss/config.hpp>
#include <metricloss/types.hpp>
#include <metricloss/errors.hpp>
#include <metricloss/exec.hpp>
#include <metricloss/thread_group.hpp>

#include <metricloss/contrastive.hpp>
#include <metricloss/backend/scalar/contrastive.hpp>
#include <metricloss/backend/simd/contrastive.hpp>

#include <metricloss/options.hpp>
#include <metricloss/triplet.hpp>
#include <metricloss/backend/scalar/triplet.hpp>
#include <metricloss/backend/simd/triplet.hpp>

#include <metricloss/lifted_structure.hpp>
#include <metricloss/backend/scalar/lifted_structure.hpp>
#include <metricloss/backend/simd/lifted_structure.hpp>

#include <metricloss/batch_triplet.hpp>
#include <metricloss/backend/scalar/batch_triplet.hpp>
#include <metricloss/backend/simd/batch_triplet.hpp>

#include <metricloss/reference.hpp>
#include <metricloss/backend/scalar/reference.hpp>
#include <metricloss/backend/simd/reference.hpp>
#include <metricloss/backend/simd/lifted_reference.hpp>
#include <metricloss/memory.hpp>
#include <metricloss/backend/sharded_batch_triplet.hpp>
#include <metricloss/backend/sharded_lifted.hpp>

#include <metricloss/batch_contrastive.hpp>
#include <metricloss/backend/scalar/batch_contrastive.hpp>
#include <metricloss/backend/simd/batch_contrastive.hpp>
#include <metricloss/backend/sharded_batch_contrastive.hpp>

#include <metricloss/multi_similarity.hpp>
#include <metricloss/backend/scalar/multi_similarity.hpp>
#include <metricloss/backend/simd/multi_similarity.hpp>
#include <metricloss/backend/sharded_multi_similarity.hpp>
